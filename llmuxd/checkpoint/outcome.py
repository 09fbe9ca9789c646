"""What a dump or a restore gives back to its caller: the failure both raise, the GPU state a
dump released first, and what a restore restored."""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import cuda as cudamod
from .model import Manifest
from .store import Found


class CheckpointFailed(Exception):
    """A dump or restore did not happen.  ``unusable``: the checkpoint itself is damaged (and
    ours: it may be quarantined)."""

    def __init__(self, message: str, *, reason: str, unusable: bool = False):
        super().__init__(message)
        self.reason = reason  # short, for the metric label
        self.unusable = unusable


@dataclass
class GpuReleased:
    """A tree's GPU state, suspended to host memory before its dump (nothing when it held none):
    from here the GPU is free for another model, and the dump may follow later."""

    suspended: list[int] = field(default_factory=list)  # pids, in suspend order
    cuda: cudamod.CudaCheckpointer | None = None
    cuda_pids: list[int] = field(default_factory=list)  # the same processes, by their PID in the tree
    cuda_bytes: dict | None = None
    seconds: float = 0.0


@dataclass
class Restored:
    root_pid: int
    found: Found
    manifest: Manifest
    prepared: list[str]
    seconds: dict[str, float]
