"""What GPUs this machine has and how much of their memory is free, per device and per process
(NVML through ctypes, or ``nvidia-smi``), and whether a suspended or checkpointed CUDA state fits
back (:func:`check_restorable`)."""

from __future__ import annotations

import ctypes
import logging
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable, Mapping
from typing import Any

log = logging.getLogger(__name__)

LIBNVML = "libnvidia-ml.so.1"

# ---------------------------------------------------------------------------------------------
# GPU inventory
# ---------------------------------------------------------------------------------------------
MIB = 1024 * 1024


class _NvmlMemory(ctypes.Structure):
    """``nvmlMemory_t``: ``{unsigned long long total, free, used;}`` (bytes)."""

    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


class _NvmlProcessInfo(ctypes.Structure):
    """``nvmlProcessInfo_t`` as used by ``nvmlDeviceGetComputeRunningProcesses_v3``."""

    _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong),
                ("gpuInstanceId", ctypes.c_uint), ("computeInstanceId", ctypes.c_uint)]


_NVML_SUCCESS = 0
_NVML_ERROR_INSUFFICIENT_SIZE = 7
_NVML_VALUE_NOT_AVAILABLE = 0xFFFFFFFFFFFFFFFF
_NVML_BUF = 96  # >= NVML_DEVICE_NAME_V2_BUFFER_SIZE, NVML_DEVICE_UUID_V2_BUFFER_SIZE, driver version (80)


class _Nvml:
    def __init__(self, library: str = LIBNVML):
        lib = ctypes.CDLL(library)
        c_uint, c_int, p = ctypes.c_uint, ctypes.c_int, ctypes.POINTER
        dev = ctypes.c_void_p  # nvmlDevice_t: an opaque pointer
        sig = {
            "nvmlInit_v2": [],
            "nvmlShutdown": [],
            "nvmlSystemGetDriverVersion": [ctypes.c_char_p, c_uint],
            "nvmlDeviceGetCount_v2": [p(c_uint)],
            "nvmlDeviceGetHandleByIndex_v2": [c_uint, p(dev)],
            "nvmlDeviceGetName": [dev, ctypes.c_char_p, c_uint],
            "nvmlDeviceGetUUID": [dev, ctypes.c_char_p, c_uint],
            "nvmlDeviceGetMemoryInfo": [dev, p(_NvmlMemory)],
        }
        for name, argtypes in sig.items():
            fn = getattr(lib, name)
            fn.argtypes = argtypes
            fn.restype = c_int
        lib.nvmlErrorString.argtypes = [c_int]
        lib.nvmlErrorString.restype = ctypes.c_char_p
        if hasattr(lib, "nvmlSystemGetCudaDriverVersion_v2"):
            lib.nvmlSystemGetCudaDriverVersion_v2.argtypes = [p(c_int)]
            lib.nvmlSystemGetCudaDriverVersion_v2.restype = c_int
        if hasattr(lib, "nvmlDeviceGetComputeRunningProcesses_v3"):
            fn = lib.nvmlDeviceGetComputeRunningProcesses_v3
            fn.argtypes = [dev, p(c_uint), p(_NvmlProcessInfo)]
            fn.restype = c_int
        self.lib = lib

    def check(self, code: int, what: str) -> None:
        if code != _NVML_SUCCESS:
            text = self.lib.nvmlErrorString(code)
            raise RuntimeError(f"{what}: {text.decode() if text else code}")

    def __enter__(self) -> "_Nvml":
        self.check(self.lib.nvmlInit_v2(), "nvmlInit_v2")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.lib.nvmlShutdown()

    def handles(self) -> list[ctypes.c_void_p]:
        n = ctypes.c_uint(0)
        self.check(self.lib.nvmlDeviceGetCount_v2(ctypes.byref(n)), "nvmlDeviceGetCount_v2")
        out = []
        for i in range(n.value):
            h = ctypes.c_void_p()
            self.check(self.lib.nvmlDeviceGetHandleByIndex_v2(i, ctypes.byref(h)), "nvmlDeviceGetHandleByIndex_v2")
            out.append(h)
        return out

    def text(self, fn: Callable, *args: Any) -> str:
        buf = ctypes.create_string_buffer(_NVML_BUF)
        self.check(fn(*args, buf, _NVML_BUF), fn.__name__)
        return buf.value.decode(errors="replace")


def _nvml_inventory(library: str) -> dict:
    with _Nvml(library) as nv:
        inv: dict[str, Any] = {"source": "nvml", "driver_version": nv.text(nv.lib.nvmlSystemGetDriverVersion),
                               "cuda_version": None, "gpus": []}
        if hasattr(nv.lib, "nvmlSystemGetCudaDriverVersion_v2"):
            v = ctypes.c_int(0)
            if nv.lib.nvmlSystemGetCudaDriverVersion_v2(ctypes.byref(v)) == _NVML_SUCCESS and v.value > 0:
                inv["cuda_version"] = f"{v.value // 1000}.{v.value % 1000 // 10}"
        for i, h in enumerate(nv.handles()):
            mem = _NvmlMemory()
            nv.check(nv.lib.nvmlDeviceGetMemoryInfo(h, ctypes.byref(mem)), "nvmlDeviceGetMemoryInfo")
            inv["gpus"].append({
                "index": i, "name": nv.text(nv.lib.nvmlDeviceGetName, h), "uuid": nv.text(nv.lib.nvmlDeviceGetUUID, h),
                "memory_total": mem.total, "memory_free": mem.free, "memory_used": mem.used,
            })
        return inv


NVIDIA_SMI_QUERY = "index,name,uuid,memory.total,memory.free,driver_version"


def _mib(field: str) -> int | None:
    field = field.strip()
    return int(float(field) * MIB) if re.fullmatch(r"\d+(\.\d+)?", field) else None


def parse_nvidia_smi(text: str) -> dict | None:
    """``nvidia-smi --query-gpu=index,name,uuid,memory.total,memory.free,driver_version
    --format=csv,noheader,nounits`` output (MiB) as an inventory; None when it lists no GPU."""
    gpus, driver = [], None
    for line in text.splitlines():
        raw = line.split(",")
        parts = [p.strip() for p in raw]
        if len(parts) < 6 or not parts[0].isdigit():
            continue
        name = ",".join(raw[1:-4]).strip()  # a name with a comma in it stays whole
        uuid, total, free, drv = parts[-4:]
        total_b, free_b = _mib(total), _mib(free)
        driver = driver or drv
        gpus.append({"index": int(parts[0]), "name": name, "uuid": uuid, "memory_total": total_b,
                     "memory_free": free_b,
                     "memory_used": total_b - free_b if total_b is not None and free_b is not None else None})
    if not gpus:
        return None
    return {"source": "nvidia-smi", "driver_version": driver, "cuda_version": None, "gpus": gpus}


def gpu_inventory(nvml: str = LIBNVML, nvidia_smi: str = "nvidia-smi") -> dict | None:
    """``{"source", "driver_version", "cuda_version", "gpus": [{"index", "name", "uuid",
    "memory_total", "memory_free", "memory_used"}]}`` (bytes), from NVML, else from
    ``nvidia-smi``; None when there is no NVIDIA GPU (or neither can say)."""
    try:
        inv = _nvml_inventory(nvml)
        return inv if inv["gpus"] else None
    except (OSError, AttributeError, RuntimeError) as e:
        log.debug("NVML: %s", e)
    exe = shutil.which(nvidia_smi) if "/" not in nvidia_smi else nvidia_smi
    if not exe:
        return None
    try:
        r = subprocess.run([exe, f"--query-gpu={NVIDIA_SMI_QUERY}", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.debug("nvidia-smi: %s", e)
        return None
    return parse_nvidia_smi(r.stdout) if r.returncode == 0 else None


def gpu_memory_by_pid(nvml: str = LIBNVML) -> dict[int, dict[str, int]] | None:
    """GPU memory each compute process holds, ``{pid: {gpu_uuid: bytes}}`` (NVML's pids: the
    host's PID namespace); None when NVML is not available.  The figure to pass (per device) as
    ``needed_bytes`` to :func:`check_restorable` before resuming a suspended tree."""
    try:
        with _Nvml(nvml) as nv:
            fn = getattr(nv.lib, "nvmlDeviceGetComputeRunningProcesses_v3", None)
            if fn is None:
                return None
            out: dict[int, dict[str, int]] = {}
            for h in nv.handles():
                uuid = nv.text(nv.lib.nvmlDeviceGetUUID, h)
                n = ctypes.c_uint(0)
                code = fn(h, ctypes.byref(n), None)
                if code == _NVML_SUCCESS:
                    continue
                if code != _NVML_ERROR_INSUFFICIENT_SIZE:
                    nv.check(code, "nvmlDeviceGetComputeRunningProcesses_v3")
                arr = (_NvmlProcessInfo * (n.value + 8))()
                n = ctypes.c_uint(n.value + 8)
                nv.check(fn(h, ctypes.byref(n), arr), "nvmlDeviceGetComputeRunningProcesses_v3")
                for i in range(n.value):
                    used = arr[i].usedGpuMemory
                    if used != _NVML_VALUE_NOT_AVAILABLE:
                        out.setdefault(int(arr[i].pid), {})[uuid] = int(used)
            return out
    except (OSError, AttributeError, RuntimeError) as e:
        log.debug("NVML: %s", e)
        return None


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1024**3:.1f} GiB" if n >= 1024**3 else f"{n / MIB:.0f} MiB"


def gpu_bytes_of(pids: Iterable[int]) -> dict[str, int]:
    """GPU memory held by ``pids``, per GPU uuid: what a resume will need free again."""
    usage = gpu_memory_by_pid() or {}
    total: dict[str, int] = {}
    for pid in pids:
        for uuid, n in usage.get(pid, {}).items():
            total[uuid] = total.get(uuid, 0) + n
    return total


def check_restorable(recorded: dict | None, needed_bytes: int | Mapping[int | str, int],
                     current: dict | None) -> list[str]:
    """Problems (plain sentences; empty = fine) with resuming, on the GPUs ``current``
    (:func:`gpu_inventory` now), CUDA state suspended where ``recorded`` was taken.

    ``needed_bytes``: the bytes to put back on each recorded GPU, as one figure for every GPU
    (a single-GPU model, or equal shards) or per device index or uuid.  A resume with too little
    free memory fails and leaves the process stuck, hence the check."""
    rec_gpus = (recorded or {}).get("gpus") or []
    if current is None or not current.get("gpus"):
        if not rec_gpus:
            return []
        return [f"no NVIDIA GPU here; the checkpoint was taken on {_describe_gpus(rec_gpus)}"]
    cur_gpus = current["gpus"]
    problems = []
    if recorded is None:
        recorded = {}
    rd, cd = recorded.get("driver_version"), current.get("driver_version")
    if rd and cd and rd != cd:
        problems.append(f"NVIDIA driver differs: {rd} at checkpoint, {cd} here")
    if rec_gpus:
        if len(rec_gpus) != len(cur_gpus):
            problems.append(f"GPU count differs: {len(rec_gpus)} at checkpoint, {len(cur_gpus)} here")
        for r, c in zip(rec_gpus, cur_gpus):
            if r.get("name") and c.get("name") and r["name"] != c["name"]:
                problems.append(f"GPU model differs on device {c.get('index')}: {r['name']} at checkpoint, "
                                f"{c['name']} here")
    targets = rec_gpus or cur_gpus[:1]
    for r in targets:
        c = next((g for g in cur_gpus if g.get("uuid") and g.get("uuid") == r.get("uuid")), None) \
            or next((g for g in cur_gpus if g.get("index") == r.get("index")), None)
        if c is None:
            problems.append(f"device {r.get('index')} ({r.get('name')}) of the checkpoint is not here")
            continue
        if isinstance(needed_bytes, Mapping):
            need = needed_bytes.get(r.get("uuid"), needed_bytes.get(r.get("index"), 0))
        else:
            need = needed_bytes
        free = c.get("memory_free")
        if need and free is not None and free < need:
            problems.append(f"not enough free memory on device {c.get('index')} ({c.get('name')}): "
                            f"need {_fmt_bytes(need)}, free {_fmt_bytes(free)}")
    return problems


def _describe_gpus(gpus: list[dict]) -> str:
    names = sorted({g.get("name") or "?" for g in gpus})
    return f"{len(gpus)} GPU(s) ({', '.join(names)})"

