"""The process axis of an eviction as strategies: what ``evict()`` does to a model's tree once
its weights are dealt with, the state it leaves the model in, and how ``resume()`` brings the
model back from that state.  ``checkpoint`` is in :mod:`.checkpoint`.

A strategy owns what only it needs to remember (the suspended PIDs of ``cuda_suspend``, the
checkpoint of ``checkpoint``); the model owns the tree (its backend), the weights step and the
state, and tells every strategy when its tree is gone (:meth:`ProcessEviction.tree_gone`).
A strategy sees its model only through :class:`ModelOps`."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import ClassVar, Protocol, Sequence

from .. import cuda as cudamod
from ..backends.vllm import BackendError, VllmBackend
from ..config import Config, Eviction
from ..config import ProcessEviction as Kind
from ..errors import NotSupported
from ..events import Listener, State, Timed

class TransitionError(Exception):
    """A transition failed; the model is left in a resting state (``STOPPED`` when escalated)."""


#: Errors after which a woken tree is given up and the model cold-starts instead.
WAKE_ERRORS = (BackendError, NotSupported, cudamod.CudaError)


class ModelOps(Protocol):
    """What a strategy may use of the model it evicts (implemented by :class:`.model.Model`)."""

    name: str
    port: int
    config: Config
    eviction: Eviction
    backend: VllmBackend
    events: Listener
    sleep_level: int | None  # the vLLM sleep level the weights are at

    def set_state(self, new: State) -> None: ...
    def phase(self, name: str, kind: str) -> AbstractContextManager[Timed]: ...
    def step(self, name: str) -> None: ...
    def note_error(self, msg: str, output: Sequence[str] | None = None) -> None: ...
    def restore_failed(self, msg: str, reason: str, output: Sequence[str] | None = None) -> None: ...
    def cuda_suspender(self) -> cudamod.CudaCheckpointer: ...
    async def cold_start(self) -> None: ...
    async def wake_weights(self) -> None: ...
    async def stop_tree(self, grace_secs: float = 10.0) -> None: ...
    async def stop_backend(self) -> None: ...


class ProcessEviction:
    """One value of the ``process`` axis.  ``resting``: the state :meth:`evict` leaves the model
    in, and from which :meth:`resume` brings it back."""

    kind: ClassVar[Kind]
    resting: ClassVar[State]

    def __init__(self, model: ModelOps):
        self.model = model

    async def before_weights(self) -> None:
        """Called while the model still serves, before its weights are put to sleep."""

    async def evict(self, *, background: bool = False) -> State:
        """Evict the (running) tree; returns the state the model rests in.  Raises on failure
        (the model then escalates to stop).  ``background``: a strategy may return as soon as
        the GPU is free, with ``DUMPING``; the model then runs :meth:`finish` on its own."""
        raise NotImplementedError

    async def finish(self) -> State:
        """The rest of an eviction that returned ``DUMPING``; returns the resting state."""
        raise NotImplementedError

    def resume_problems(self) -> list[str]:
        """Why :meth:`resume` would fail here, checked before anything is touched ([] if none),
        each prefixed with what cannot be resumed."""
        return []

    def expected_kind(self) -> str:
        """What :meth:`resume` will return unless it has to fall back to a cold start."""
        raise NotImplementedError

    async def resume(self) -> str:
        """Bring the model from :attr:`resting` to a serving tree; returns how (``wake``,
        ``resume``, ``restore``, ``cold_start``).  Raises TransitionError when the model cannot
        serve."""
        raise NotImplementedError

    def tree_gone(self) -> None:
        """The model's tree was stopped: forget what described it."""


class Stop(ProcessEviction):
    """``stop``: end the tree; the next wake is a cold start."""

    kind = Kind.STOP
    resting = State.STOPPED

    async def evict(self, *, background: bool = False) -> State:
        self.model.step("stop")
        await self.model.stop_tree()
        return State.STOPPED

    def expected_kind(self) -> str:
        return "cold_start"

    async def resume(self) -> str:
        await self.model.cold_start()
        return "cold_start"


class KeepRunning(ProcessEviction):
    """``keep_running``: the tree stays; only the weights were evicted.  A wake that fails gives
    the tree up and cold-starts."""

    kind = Kind.KEEP_RUNNING
    resting = State.ASLEEP

    async def evict(self, *, background: bool = False) -> State:
        return self.resting

    def expected_kind(self) -> str:
        return "wake"

    async def resume(self) -> str:
        m = self.model
        try:
            m.set_state(State.WAKING)
            m.backend.mark("waking")
            kind = await self.resume_process()
            await m.wake_weights()
            return kind
        except WAKE_ERRORS as e:
            m.note_error(f"wake failed: {e}; stopping it and cold-starting instead", m.backend.output_tail())
            await m.stop_backend()
            await m.cold_start()
            return "cold_start"

    async def resume_process(self) -> str:
        """What the process needs before its weights can wake (nothing: it kept running);
        returns the kind of wake."""
        return "wake"


class CudaSuspend(KeepRunning):
    """``cuda_suspend``: the tree stays, its GPU processes' CUDA state is copied to host memory
    (the GPU is free).  A resume into too little free GPU memory would leave a process stuck for
    good, so it is checked first and refused with nothing touched."""

    kind = Kind.CUDA_SUSPEND
    resting = State.SUSPENDED

    def __init__(self, model: ModelOps):
        super().__init__(model)
        self.suspended: list[int] = []  # pids whose CUDA state is suspended, in suspend order
        self._needs: tuple[dict | None, dict] = (None, {})  # the GPUs and bytes at suspend

    async def evict(self, *, background: bool = False) -> State:
        gpu_pids = cudamod.gpu_processes(self.model.backend.pids())
        if gpu_pids:  # no GPU state (CPU backend, no GPU here): nothing to suspend
            self.model.step("cuda_suspend")
            self._needs = (cudamod.gpu_inventory(), cudamod.gpu_bytes_of(gpu_pids))
            self.suspended = await cudamod.suspend_tree(gpu_pids, self.model.cuda_suspender())
        return self.resting

    def resume_problems(self) -> list[str]:
        if not self.suspended:
            return []
        recorded, needed = self._needs
        problems = cudamod.check_restorable(recorded, needed, cudamod.gpu_inventory())
        return ["cannot resume CUDA state here: " + "; ".join(problems)] if problems else []

    def expected_kind(self) -> str:
        return "resume" if self.suspended else "wake"

    async def resume_process(self) -> str:
        """``resume`` when CUDA state was suspended; ``wake`` when there was none to suspend."""
        if not self.suspended:
            return "wake"
        self.model.step("cuda_resume")
        await cudamod.resume_tree(self.suspended, self.model.cuda_suspender())
        self.suspended = []
        return "resume"

    def tree_gone(self) -> None:
        self.suspended = []
