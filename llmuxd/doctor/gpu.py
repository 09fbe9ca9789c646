"""GPUs and CUDA: the NVIDIA GPUs and driver, the two CUDA suspend backends (the driver API and
``cuda-checkpoint``) and the one llmuxd will use, CRIU's CUDA plugin.  The facts
(:func:`cuda_facts`) and their judgement (:func:`cuda_checks`, pure)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import cuda
from ..config import CheckpointConfig
from .probe import resolve
from .report import NO, OK, WARN, Check


def cuda_facts(ckpt: CheckpointConfig, libcuda: str = cuda.LIBCUDA, nvml: str = cuda.LIBNVML,
               nvidia_smi: str = "nvidia-smi") -> dict[str, Any]:
    f: dict[str, Any] = {"driver_api": False, "driver_api_detail": "", "binary": None, "binary_ok": False,
                         "binary_detail": "", "selected": None, "selected_detail": "",
                         "plugin": None, "plugin_dir": ckpt.cuda_plugin_dir, "gpu": None,
                         "device_nodes": sorted(str(p) for p in Path("/dev").glob("nvidia*"))}
    try:
        drv = cuda.DriverBackend(libcuda)
        try:
            drv.init()
            f["driver_api"], f["driver_api_detail"] = True, drv.describe() + ": cuCheckpointProcess*"
        except cuda.CudaError as e:
            f["driver_api_detail"] = f"{drv.describe()} has cuCheckpoint*, but {e.message}"
    except OSError as e:
        f["driver_api_detail"] = f"{libcuda} {cuda.short_oserror(e)}"
    except AttributeError as e:
        f["driver_api_detail"] = str(e)
    f["binary"] = resolve(ckpt.cuda_checkpoint_path)
    try:
        b = cuda.BinaryBackend(ckpt.cuda_checkpoint_path)
        f["binary_ok"], f["binary_detail"] = True, b.describe()
    except (OSError, RuntimeError) as e:
        f["binary_detail"] = str(e)
    cp, reason = cuda.select_checkpointer(ckpt.cuda_checkpoint_path, libcuda)
    f["selected"] = cp.kind if cp else None
    f["selected_detail"] = reason
    plugin = Path(ckpt.cuda_plugin_dir) / "cuda_plugin.so"
    f["plugin"] = str(plugin) if plugin.is_file() else None
    f["gpu"] = cuda.gpu_inventory(nvml, nvidia_smi)
    return f


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / 1024**3:.0f} GiB"


def describe_gpus(inv: dict | None) -> str:
    if not inv:
        return "no NVIDIA GPU"
    parts = [f"{g['index']}: {g['name']} ({_gib(g.get('memory_total'))}, {_gib(g.get('memory_free'))} free)"
             for g in inv["gpus"]]
    return f"{len(parts)} GPU(s): " + "; ".join(parts) + f"; driver {inv.get('driver_version')} (via {inv['source']})"


def cuda_checks(facts: dict[str, Any], ckpt_models: list[str], suspend_models: list[str]) -> list[Check]:
    """The CUDA lines; CUDA suspend is required on a GPU machine where some model suspends or
    checkpoints."""
    checks: list[Check] = []
    add = checks.append
    cu = facts["cuda"]
    gpu = cu["gpu"]
    add(Check("CUDA", "GPU", OK if gpu else WARN, describe_gpus(gpu),
              "" if gpu else "models run on CPU only (vLLM's CPU build, or the simulator)"))
    add(Check("CUDA", "driver API", OK if cu["driver_api"] else WARN, cu["driver_api_detail"]))
    add(Check("CUDA", "cuda-checkpoint", OK if cu["binary_ok"] else WARN, cu["binary_detail"],
              "" if cu["binary_ok"] or cu["driver_api"] else
              "install NVIDIA's cuda-checkpoint (github NVIDIA/cuda-checkpoint) or set checkpoint.cuda_checkpoint_path"))
    # A GPU tree must have its CUDA state suspended before a plain CRIU dump (or CRIU's CUDA plugin does it).
    need_suspend = bool(gpu) and bool(suspend_models or ckpt_models)
    users = ", ".join(suspend_models + [m for m in ckpt_models if m not in suspend_models])
    if cu["selected"]:
        add(Check("CUDA", "CUDA suspend", OK, f"llmuxd will use the {cu['selected_detail']}"))
    elif need_suspend and not cu["plugin"]:
        add(Check("CUDA", "CUDA suspend", NO, f"needed by {users} on this GPU machine; {cu['selected_detail']}",
                  "install a driver >= 570 (cuCheckpoint* in libcuda) or cuda-checkpoint", required=True))
    elif suspend_models and not gpu:
        add(Check("CUDA", "CUDA suspend", WARN, f"{', '.join(suspend_models)} use `cuda_suspend`, but there is no "
                  "NVIDIA GPU here: nothing to suspend (fine for CPU vLLM / the simulator)"))
    else:
        add(Check("CUDA", "CUDA suspend", WARN, cu["selected_detail"]))
    if cu["plugin"]:
        add(Check("CUDA", "CRIU CUDA plugin", OK, f"{cu['plugin']}: CRIU loads it from its plugin dir and "
                  "suspends CUDA itself during dumps"))
    else:
        add(Check("CUDA", "CRIU CUDA plugin", OK, f"no cuda_plugin.so in {cu['plugin_dir']}: not needed, llmuxd "
                  "suspends CUDA before the dump"))
    return checks
