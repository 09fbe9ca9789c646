"""CUDA suspend/resume of a model tree's GPU processes, driven from outside those processes.

A suspended CUDA process has its device memory copied into host memory and holds no GPU
resources any more (no ``/dev/nvidia*`` fds or mappings): the GPU is free for another model, and
plain CRIU (no CUDA plugin) can dump the process.  Resuming copies the memory back and re-acquires
the GPU.  Measured on an H200 (docs/measured.md): lock/unlock < 2 ms, checkpoint ~1.8 GB/s,
restore faster; a resume with too little free GPU memory fails and leaves the process stuck for
good, so check free memory first (:func:`.inventory.check_restorable`).

:func:`select_checkpointer` picks the first backend (:mod:`.backends`) that works here and says
why in plain words.  :func:`suspend_tree` / :func:`resume_tree` orchestrate a whole tree: every
GPU process is locked before any is checkpointed (no peer can launch work, e.g. an NCCL
collective, while another is being copied out), and resumed in reverse; a failure mid-way
resumes what was suspended.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

from .backends import DEFAULT_LOCK_TIMEOUT_MS, LIBCUDA, NO_CUDA, BinaryBackend, CudaError, DriverBackend, short_oserror


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
        notes.append(f"{libcuda} not loadable ({short_oserror(e)})")
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



class SuspendChoice:
    """The daemon's one choice of CUDA suspend backend, shared by every model: made on first
    use (most daemons never hold GPU state in a tree they evict, and choosing loads the
    driver), then kept."""

    def __init__(self, cuda_checkpoint_path: str = "cuda-checkpoint"):
        self.cuda_checkpoint_path = cuda_checkpoint_path
        self._chosen: tuple[CudaCheckpointer | None, str] | None = None

    def get(self) -> CudaCheckpointer | None:
        """The backend, or None when there is none here (:attr:`why` says why)."""
        if self._chosen is None:
            self._chosen = select_checkpointer(self.cuda_checkpoint_path)
            log.info("CUDA suspend: %s", self._chosen[1])
        return self._chosen[0]

    @property
    def why(self) -> str:
        self.get()
        assert self._chosen is not None
        return self._chosen[1]

    def require(self, holder: str, error: Callable[[str], Exception]) -> CudaCheckpointer:
        """The backend, for ``holder`` (what holds GPU state); else ``error(message)`` is raised,
        the message saying why there is none."""
        cuda = self.get()
        if cuda is None:
            raise error(f"{holder} GPU state but no CUDA suspend (driver API or cuda-checkpoint) "
                        f"is available here: {self.why}")
        return cuda


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


