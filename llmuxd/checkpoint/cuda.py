"""CUDA suspend/resume of a model tree's GPU processes, driven from outside those processes.

A suspended CUDA process has its device memory copied into host memory and holds no GPU
resources any more (no ``/dev/nvidia*`` fds or mappings): the GPU is free for another model, and
plain CRIU (no CUDA plugin) can dump the process.  Resuming copies the memory back and re-acquires
the GPU.  Measured on an H200 (docs/measured.md): lock/unlock < 2 ms, checkpoint ~1.8 GB/s,
restore faster; a resume with too little free GPU memory fails and leaves the process stuck for
good, so check free memory first (:func:`check_restorable`).

Two backends do the same thing:

* the CUDA driver API through ctypes on ``libcuda.so.1`` (driver >= 570):
  ``cuCheckpointProcessLock / Checkpoint / Restore / Unlock / GetState``;
* NVIDIA's ``cuda-checkpoint`` utility: ``--action lock|checkpoint|restore|unlock`` on newer
  builds, only ``--toggle`` (running <-> checkpointed) on older ones.

:func:`select_checkpointer` picks the first that works here and says why in plain words.
:func:`suspend_tree` / :func:`resume_tree` orchestrate a whole tree: every GPU process is locked
before any is checkpointed (no peer can launch work, e.g. an NCCL collective, while another is
being copied out), and resumed in reverse; a failure mid-way resumes what was suspended.

GPU inventory (:func:`gpu_inventory`) comes from NVML through ctypes, or from ``nvidia-smi``.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LIBCUDA = "libcuda.so.1"
LIBNVML = "libnvidia-ml.so.1"

# CUprocessState
PROCESS_STATES = {0: "running", 1: "locked", 2: "checkpointed", 3: "failed", 4: "checkpointing", 5: "restoring"}
#: state() of a process without CUDA state (the driver answers CUDA_ERROR_NOT_INITIALIZED).
NO_CUDA = "none"

# CUresult codes used here by number (names come from cuGetErrorName when the driver is there).
CUDA_SUCCESS = 0
CUDA_ERROR_NOT_INITIALIZED = 3
_CUDA_ERROR_NAMES = {
    1: "CUDA_ERROR_INVALID_VALUE", 2: "CUDA_ERROR_OUT_OF_MEMORY", 3: "CUDA_ERROR_NOT_INITIALIZED",
    100: "CUDA_ERROR_NO_DEVICE", 304: "CUDA_ERROR_OPERATING_SYSTEM", 401: "CUDA_ERROR_ILLEGAL_STATE",
    801: "CUDA_ERROR_NOT_SUPPORTED", 909: "CUDA_ERROR_TIMEOUT",
}

CHECKPOINT_SYMBOLS = (
    "cuCheckpointProcessLock", "cuCheckpointProcessCheckpoint", "cuCheckpointProcessRestore",
    "cuCheckpointProcessUnlock", "cuCheckpointProcessGetState",
)

# An operation on a multi-GB process takes seconds to minutes (1.8 GB/s measured); a hung
# cuda-checkpoint must still not hang llmuxd forever.
DEFAULT_OP_TIMEOUT = 900.0
DEFAULT_LOCK_TIMEOUT_MS = 30_000


class CudaError(Exception):
    """A CUDA suspend/resume step failed.  ``message`` carries the driver's (or the utility's) words."""

    def __init__(self, message: str, *, code: int | None = None, pid: int | None = None, op: str | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.pid = pid
        self.op = op


# ---------------------------------------------------------------------------------------------
# Which processes hold CUDA state
# ---------------------------------------------------------------------------------------------
def _holds_nvidia(pid: int, proc: Path) -> bool:
    base = proc / str(pid)
    try:
        for fd in os.listdir(base / "fd"):
            try:
                if os.readlink(base / "fd" / fd).startswith("/dev/nvidia"):
                    return True
            except OSError:  # closed meanwhile
                continue
        with open(base / "maps", encoding="utf-8", errors="replace") as f:
            return any("/dev/nvidia" in line for line in f)
    except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
        return False  # gone
    except PermissionError:
        log.debug("cannot inspect pid %d (permission denied)", pid)
        return False


def gpu_processes(pids: Iterable[int], proc: Path | str = "/proc") -> list[int]:
    """The pids among ``pids`` (order kept) holding an open fd or a mapping of ``/dev/nvidia*``:
    the processes with CUDA state on a GPU.  A suspended process holds none, so this finds the
    processes to suspend, not the ones to resume (keep :func:`suspend_tree`'s answer for that)."""
    root = Path(proc)
    return [p for p in pids if _holds_nvidia(int(p), root)]


# ---------------------------------------------------------------------------------------------
# Backend 1: the CUDA driver API through ctypes
# ---------------------------------------------------------------------------------------------
class _CUcheckpointLockArgs(ctypes.Structure):
    """``CUcheckpointLockArgs``: ``{unsigned int timeoutMs; unsigned int reserved0; cuuint64_t reserved1[7];}``
    (timeoutMs 0 = no timeout; reserved fields must be zero: ctypes zero-fills)."""

    _fields_ = [("timeoutMs", ctypes.c_uint), ("reserved0", ctypes.c_uint), ("reserved1", ctypes.c_uint64 * 7)]


class DriverBackend:
    """``cuCheckpointProcess*`` from ``libcuda.so.1``.  Construction loads the library and checks
    the symbols (raises ``OSError``/``AttributeError``); :meth:`init` runs ``cuInit(0)`` once."""

    kind = "driver"

    def __init__(self, library: str = LIBCUDA):
        self.library = library
        lib = ctypes.CDLL(library)
        c_int, c_uint = ctypes.c_int, ctypes.c_uint
        lib.cuInit.argtypes = [c_uint]
        lib.cuInit.restype = c_int
        lib.cuDriverGetVersion.argtypes = [ctypes.POINTER(c_int)]
        lib.cuDriverGetVersion.restype = c_int
        for name in ("cuGetErrorString", "cuGetErrorName"):
            fn = getattr(lib, name)
            fn.argtypes = [c_int, ctypes.POINTER(ctypes.c_char_p)]
            fn.restype = c_int
        missing = [s for s in CHECKPOINT_SYMBOLS if not hasattr(lib, s)]
        if missing:
            raise AttributeError(f"{library} has no {', '.join(missing)} (CUDA checkpoint needs driver >= 570)")
        # CUresult cuCheckpointProcessLock(int pid, CUcheckpointLockArgs *args)
        lib.cuCheckpointProcessLock.argtypes = [c_int, ctypes.POINTER(_CUcheckpointLockArgs)]
        # CUresult cuCheckpointProcess{Checkpoint,Restore,Unlock}(int pid, CU...Args *args): args NULL
        for name in ("cuCheckpointProcessCheckpoint", "cuCheckpointProcessRestore", "cuCheckpointProcessUnlock"):
            getattr(lib, name).argtypes = [c_int, ctypes.c_void_p]
        # CUresult cuCheckpointProcessGetState(int pid, CUprocessState *state): an enum, int-sized
        lib.cuCheckpointProcessGetState.argtypes = [c_int, ctypes.POINTER(c_int)]
        for name in CHECKPOINT_SYMBOLS:
            getattr(lib, name).restype = c_int
        self._lib = lib
        self._init_lock = threading.Lock()
        self._initialised = False

    def driver_version(self) -> str | None:
        v = ctypes.c_int(0)
        if self._lib.cuDriverGetVersion(ctypes.byref(v)) != CUDA_SUCCESS or v.value <= 0:
            return None
        return f"{v.value // 1000}.{v.value % 1000 // 10}"

    def error_text(self, code: int) -> str:
        name, text = ctypes.c_char_p(), ctypes.c_char_p()
        if self._lib.cuGetErrorName(code, ctypes.byref(name)) != CUDA_SUCCESS or not name.value:
            name = None
        if self._lib.cuGetErrorString(code, ctypes.byref(text)) != CUDA_SUCCESS or not text.value:
            text = None
        label = name.value.decode() if name is not None else _CUDA_ERROR_NAMES.get(code, f"CUresult {code}")
        return f"{label}: {text.value.decode()}" if text is not None else label

    def _check(self, code: int, op: str, pid: int | None) -> None:
        if code != CUDA_SUCCESS:
            where = f"{op}({pid})" if pid is not None else op
            raise CudaError(f"{where} failed: {self.error_text(code)}", code=code, pid=pid, op=op)

    def init(self) -> None:
        with self._init_lock:
            if not self._initialised:
                self._check(self._lib.cuInit(0), "cuInit", None)
                self._initialised = True

    def lock(self, pid: int, timeout_ms: int | None = None) -> None:
        self.init()
        args = None
        if timeout_ms:
            args = ctypes.pointer(_CUcheckpointLockArgs(timeoutMs=int(timeout_ms)))
        self._check(self._lib.cuCheckpointProcessLock(pid, args), "cuCheckpointProcessLock", pid)

    def checkpoint(self, pid: int) -> None:
        self.init()
        self._check(self._lib.cuCheckpointProcessCheckpoint(pid, None), "cuCheckpointProcessCheckpoint", pid)

    def restore(self, pid: int) -> None:
        self.init()
        self._check(self._lib.cuCheckpointProcessRestore(pid, None), "cuCheckpointProcessRestore", pid)

    def unlock(self, pid: int) -> None:
        self.init()
        self._check(self._lib.cuCheckpointProcessUnlock(pid, None), "cuCheckpointProcessUnlock", pid)

    def state(self, pid: int) -> str:
        self.init()
        st = ctypes.c_int(-1)
        code = self._lib.cuCheckpointProcessGetState(pid, ctypes.byref(st))
        if code == CUDA_ERROR_NOT_INITIALIZED:  # measured: a process without CUDA state
            return NO_CUDA
        self._check(code, "cuCheckpointProcessGetState", pid)
        return PROCESS_STATES.get(st.value, f"unknown({st.value})")

    def describe(self) -> str:
        v = self.driver_version()
        return f"CUDA driver API ({self.library}{f', CUDA {v}' if v else ''})"


# ---------------------------------------------------------------------------------------------
# Backend 2: NVIDIA's cuda-checkpoint utility
# ---------------------------------------------------------------------------------------------
def parse_help(text: str) -> dict[str, bool] | None:
    """What a ``cuda-checkpoint --help`` output offers: ``{"toggle", "get_state", "action"}``, or
    None when it is not cuda-checkpoint's help (e.g. a loader error)."""
    flags = {"toggle": "--toggle" in text, "get_state": "--get-state" in text, "action": "--action" in text}
    if not (flags["toggle"] or flags["action"]):
        return None
    if flags["action"]:  # the 570+ help lists the actions it accepts
        flags["action"] = all(a in text for a in ("lock", "checkpoint", "restore", "unlock"))
    return flags


def parse_state(text: str) -> str:
    """A ``cuda-checkpoint --get-state`` output (``running``, ``locked``, ``checkpointed``,
    ``failed``...) as one of :data:`PROCESS_STATES`'s words, :data:`NO_CUDA`, or ``unknown``."""
    low = text.strip().lower()
    # The driver's CUDA_ERROR_NOT_INITIALIZED: the process has no CUDA state.  cuda-checkpoint
    # 580 says: Error getting process state for process ID N: "initialization error"
    if "not_initialized" in low or "not initialized" in low or "initialization error" in low:
        return NO_CUDA
    words = re.findall(r"[a-z_]+", low)
    for w in words:
        if w in PROCESS_STATES.values():
            return w
    return "unknown"


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


class BinaryBackend:
    """NVIDIA's ``cuda-checkpoint``.  Construction resolves the path and runs ``--help`` (raises
    ``FileNotFoundError`` / ``RuntimeError`` with the reason when it does not run)."""

    kind = "binary"

    def __init__(self, path: str = "cuda-checkpoint", op_timeout: float = DEFAULT_OP_TIMEOUT):
        resolved = path if "/" in path else shutil.which(path)
        if not resolved or not os.path.isfile(resolved):
            raise FileNotFoundError(f"{path} not found" + ("" if "/" in path else " on PATH"))
        if not os.access(resolved, os.X_OK):
            raise PermissionError(f"{resolved} is not executable")
        self.path = resolved
        self.op_timeout = op_timeout
        try:
            r = subprocess.run([resolved, "--help"], capture_output=True, text=True, timeout=15)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise RuntimeError(f"{resolved} --help did not run: {e}") from None
        flags = parse_help(r.stdout + r.stderr)
        if flags is None:
            why = _last_line(r.stderr) or _last_line(r.stdout) or f"exit status {r.returncode}"
            raise RuntimeError(f"{resolved} does not run here: {why}")
        self.has_actions = flags["action"]
        self.has_get_state = flags["get_state"]

    def _run(self, args: list[str], op: str, pid: int, timeout: float | None = None) -> str:
        argv = [self.path, *args]
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout or self.op_timeout)
        except subprocess.TimeoutExpired:
            raise CudaError(f"{' '.join(argv)} did not finish in {timeout or self.op_timeout:g} s",
                            pid=pid, op=op) from None
        except OSError as e:
            raise CudaError(f"cannot run {self.path}: {e.strerror}", pid=pid, op=op) from None
        if r.returncode != 0:
            why = _last_line(r.stderr) or _last_line(r.stdout) or "no message"
            raise CudaError(f"{' '.join(argv[1:])} failed (exit status {r.returncode}): {why}",
                            code=r.returncode, pid=pid, op=op)
        return r.stdout

    def state(self, pid: int) -> str:
        if not self.has_get_state:
            raise CudaError(f"{self.path} has no --get-state", pid=pid, op="get-state")
        try:
            out = self._run(["--get-state", "--pid", str(pid)], "get-state", pid, timeout=60)
        except CudaError as e:
            if parse_state(e.message) == NO_CUDA:
                return NO_CUDA
            raise
        return parse_state(out)

    def _action(self, action: str, pid: int, extra: list[str] = ()) -> None:
        self._run(["--action", action, "--pid", str(pid), *extra], action, pid)

    def _toggle(self, pid: int, expect: str, op: str) -> None:
        """Old utilities only toggle: refuse to toggle the wrong way round."""
        st = self.state(pid) if self.has_get_state else expect
        if st != expect:
            raise CudaError(f"{op}({pid}): process is {st}, expected {expect} (this cuda-checkpoint "
                            "only has --toggle)", pid=pid, op=op)
        self._run(["--toggle", "--pid", str(pid)], op, pid)

    # Without --action, lock+checkpoint is one toggle (and restore+unlock another): lock and
    # unlock then only check the state; there is no tree-wide lock before the first checkpoint.
    def lock(self, pid: int, timeout_ms: int | None = None) -> None:
        if self.has_actions:
            self._action("lock", pid, ["--timeout", str(int(timeout_ms))] if timeout_ms else [])
        elif self.has_get_state and (st := self.state(pid)) != "running":
            raise CudaError(f"lock({pid}): process is {st}, expected running", pid=pid, op="lock")

    def checkpoint(self, pid: int) -> None:
        if self.has_actions:
            self._action("checkpoint", pid)
        else:
            self._toggle(pid, "running", "checkpoint")

    def restore(self, pid: int) -> None:
        if self.has_actions:
            self._action("restore", pid)
        else:
            self._toggle(pid, "checkpointed", "restore")

    def unlock(self, pid: int) -> None:
        if self.has_actions:
            self._action("unlock", pid)

    def describe(self) -> str:
        mode = "--action lock|checkpoint|restore|unlock" if self.has_actions else "--toggle only"
        return f"cuda-checkpoint utility ({self.path}, {mode})"


# ---------------------------------------------------------------------------------------------
# The checkpointer and its selection
# ---------------------------------------------------------------------------------------------
class CudaCheckpointer:
    """Async facade over one backend.  Every call blocks in a worker thread; a call cannot be
    interrupted half-way (the driver finishes it), so on cancellation it waits for the call to
    end before re-raising: the process's CUDA state is then known to whoever cleans up."""

    def __init__(self, backend: DriverBackend | BinaryBackend, reason: str = ""):
        self.backend = backend
        self.reason = reason or backend.describe()

    @property
    def kind(self) -> str:
        return self.backend.kind

    @property
    def has_lock(self) -> bool:
        """Whether lock is a separate step (False: an old cuda-checkpoint with only --toggle)."""
        return self.backend.kind == "driver" or getattr(self.backend, "has_actions", False)

    async def _call(self, fn: Callable, *args: Any) -> Any:
        fut = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            await asyncio.wait({fut})
            raise

    async def lock(self, pid: int, timeout_ms: int | None = None) -> None:
        await self._call(self.backend.lock, pid, timeout_ms)

    async def checkpoint(self, pid: int) -> None:
        await self._call(self.backend.checkpoint, pid)

    async def restore(self, pid: int) -> None:
        await self._call(self.backend.restore, pid)

    async def unlock(self, pid: int) -> None:
        await self._call(self.backend.unlock, pid)

    async def state(self, pid: int) -> str:
        return await self._call(self.backend.state, pid)

    def __repr__(self) -> str:
        return f"<CudaCheckpointer {self.reason}>"


def select_checkpointer(cuda_checkpoint_path: str = "cuda-checkpoint", libcuda: str = LIBCUDA, *,
                        init: bool = True) -> tuple[CudaCheckpointer | None, str]:
    """The CUDA suspend backend usable here and why: the driver API when ``libcuda`` loads, has
    the ``cuCheckpoint*`` symbols and (``init``) ``cuInit(0)`` succeeds; else the ``cuda-checkpoint``
    utility when it exists and runs; else ``(None, reason)``."""
    notes = []
    try:
        drv = DriverBackend(libcuda)
        if init:
            drv.init()
        return CudaCheckpointer(drv), drv.describe()
    except OSError as e:
        notes.append(f"{libcuda} not loadable ({_short_oserror(e)})")
    except AttributeError as e:
        notes.append(str(e))
    except CudaError as e:
        notes.append(f"{libcuda}: {e.message}")
    try:
        binary = BinaryBackend(cuda_checkpoint_path)
        reason = binary.describe()
        if notes:
            reason += f"; driver API unavailable: {notes[0]}"
        return CudaCheckpointer(binary, reason), reason
    except (OSError, RuntimeError) as e:
        notes.append(str(e))
    return None, "no CUDA suspend: " + "; ".join(notes)


def _short_oserror(e: OSError) -> str:
    text = str(e)
    return "not installed" if "cannot open shared object file" in text else text


# ---------------------------------------------------------------------------------------------
# Whole trees
# ---------------------------------------------------------------------------------------------
async def suspend_tree(pids: Iterable[int], checkpointer: CudaCheckpointer, *,
                       select: Callable[[list[int]], list[int]] = gpu_processes,
                       lock_timeout_ms: int | None = DEFAULT_LOCK_TIMEOUT_MS) -> list[int]:
    """Suspend every GPU process among ``pids``: lock all, then checkpoint all.  Returns the pids
    suspended, in order: keep that list for :func:`resume_tree` (a suspended process no longer
    shows up in :func:`gpu_processes`).  On any failure (or cancellation) mid-way, what was locked
    or checkpointed is resumed and the error is re-raised."""
    targets = list(select(list(pids)))
    done: list[int] = []  # touched so far (locked, maybe checkpointed)
    try:
        for pid in targets:
            done.append(pid)
            await checkpointer.lock(pid, lock_timeout_ms)
        for pid in targets:
            await checkpointer.checkpoint(pid)
    except BaseException as exc:
        log.warning("CUDA suspend of %s failed (%s): resuming %s", targets, exc, done)
        try:
            await resume_tree(done, checkpointer)
        except BaseException as rollback:  # noqa: BLE001 - the first error is the one to report
            log.error("resuming after the failed suspend failed too: %s", rollback)
        raise
    return targets


async def resume_tree(pids: Iterable[int], checkpointer: CudaCheckpointer) -> list[int]:
    """Resume the processes :func:`suspend_tree` suspended: restore all (reverse order), then
    unlock all (reverse order).  Each pid's current state decides what it needs (checkpointed:
    restore + unlock; locked: unlock; running or no CUDA: nothing), so this also rolls back a
    half-done suspend.  Every process is attempted; failures are raised together at the end as
    one :class:`CudaError` (a process whose restore failed is stuck: kill it and restore its
    CRIU images again).  Returns the pids resumed."""
    order = list(reversed(list(pids)))
    errors: list[CudaError] = []
    states: dict[int, str] = {}
    for pid in order:
        try:
            states[pid] = await checkpointer.state(pid)
        except CudaError as e:
            errors.append(e)
    to_unlock = []
    for pid in order:
        st = states.get(pid)
        if st == "checkpointed":
            try:
                await checkpointer.restore(pid)
            except CudaError as e:
                errors.append(e)
                continue
            st = "locked"
        if st == "locked":
            to_unlock.append(pid)
        elif st not in (None, "running", NO_CUDA):
            errors.append(CudaError(f"process {pid} is in CUDA state {st!r}: cannot resume it", pid=pid, op="resume"))
    resumed = []
    for pid in to_unlock:
        try:
            if checkpointer.has_lock:
                await checkpointer.unlock(pid)
            resumed.append(pid)
        except CudaError as e:
            errors.append(e)
    if errors:
        first = errors[0]
        msg = "; ".join(e.message for e in errors)
        raise CudaError(f"CUDA resume failed: {msg}", code=first.code, pid=first.pid, op=first.op)
    return resumed


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
