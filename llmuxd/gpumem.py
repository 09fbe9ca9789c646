"""GPU memory now, per device and per model, for the control API and the status page.

From NVML (or ``nvidia-smi``) where there is an NVIDIA GPU; each model's share is what its
processes hold.  Without one, when the models are llmuxd-vllm-sim, from the simulator's GPU
budget (``llmuxd.sim.gpu``); otherwise there is nothing to show (``source`` None).

Asking NVML (or running ``nvidia-smi``) is done in a thread, at most once per
``MIN_INTERVAL_SECS``: a page polling every second from several browsers costs one query."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING

from . import cuda
from .status import GpuDevice, GpuMemory

if TYPE_CHECKING:
    from .switcher import Switcher

MIN_INTERVAL_SECS = 1.0
SIMULATOR = "llmuxd-vllm-sim"


def _nvidia(owners: dict[str, list[int]]) -> GpuMemory | None:
    inv = cuda.gpu_inventory()
    if inv is None:
        return None
    devices = [GpuDevice(index=g["index"], name=g["name"], memory_total=g.get("memory_total"),
                         memory_used=g.get("memory_used"), memory_free=g.get("memory_free")) for g in inv["gpus"]]
    usage = cuda.gpu_memory_by_pid() or {}
    by_model = {name: sum(sum(usage.get(pid, {}).values()) for pid in pids) for name, pids in owners.items()}
    return GpuMemory(source=inv["source"], devices=devices, by_model={n: b for n, b in by_model.items() if b})


def _simulated(served: dict[str, str]) -> GpuMemory:
    from .sim import gpu as simgpu

    use = simgpu.usage()
    total, used = use["budget"], use["used"]
    by_model: dict[str, int] = {}
    for lease in use["leases"]:  # a lease names the served model; only configured ones are shown
        if (name := served.get(str(lease.get("model")))) is not None:
            by_model[name] = by_model.get(name, 0) + int(lease["bytes"])
    device = GpuDevice(index=0, name="simulated GPU", memory_total=total, memory_used=used,
                       memory_free=max(total - used, 0))
    return GpuMemory(source="simulator", devices=[device], by_model=by_model)


def snapshot(owners: dict[str, list[int]], served: dict[str, str], simulated: bool) -> GpuMemory:
    """``owners``: each model's pids; ``served``: served model name -> model; ``simulated``:
    the models are the simulator (used when there is no NVIDIA GPU)."""
    found = _nvidia(owners)
    if found is not None:
        return found
    return _simulated(served) if simulated else GpuMemory(source=None)


class GpuMonitor:
    def __init__(self, switcher: "Switcher"):
        self.switcher = switcher
        command = switcher.config.vllm_command.split()
        self.simulated = bool(command) and Path(command[0]).name == SIMULATOR
        self._last: tuple[float, GpuMemory] | None = None
        self._lock = asyncio.Lock()

    async def memory(self) -> GpuMemory:
        async with self._lock:
            if self._last is not None and time.monotonic() - self._last[0] < MIN_INTERVAL_SECS:
                return self._last[1]
            models = self.switcher.models
            owners = {name: m.backend.pids() for name, m in models.items()}
            served = {m.backend.served_name: name for name, m in models.items()}
            found = await asyncio.to_thread(snapshot, owners, served, self.simulated)
            self._last = (time.monotonic(), found)
            return found
