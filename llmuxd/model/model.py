"""A model's state machine: cold start, wake, sleep, stop, adoption after a restart.

``sleep`` is the two axes of an eviction in order: the weights step (vLLM's sleep level), then
the process strategy's ``evict`` (:mod:`.eviction`, :mod:`.checkpoint`); any failing step
escalates to stop.  ``wake`` asks the strategy that owns the resting state to ``resume``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Sequence

from .. import cuda as cudamod
from .. import modellog, redact
from ..backends.vllm import BackendError, VllmBackend
from ..checkpoint.checkpointer import Checkpointer
from ..checkpoint.outcome import CheckpointFailed
from ..checkpoint.criu import Criu
from ..checkpoint.store import Settings
from ..config import CheckpointConfig, Config
from ..errors import NotSupported
from ..events import ESCALATED, Events, Listener, State, Timed, phase
from ..isolation import procfs
from ..isolation.cgroups import Cgroup
from ..logfollow import Source
from ..status import DumpRecord, EvictionPolicy, ModelStatus, RestoreRecord, ReusedCheckpoint
from .checkpoint import Checkpoint
from .eviction import CudaSuspend, KeepRunning, ProcessEviction, Stop, TransitionError

log = logging.getLogger(__name__)

__all__ = ["Model", "TransitionError"]

#: Errors of an eviction step after which the model escalates to stop.
EVICTION_ERRORS = (BackendError, NotSupported, CheckpointFailed, cudamod.CudaError)


class Model:
    def __init__(self, name: str, config: Config, events: Listener | None = None, cgroup: Cgroup | None = None,
                 cuda: cudamod.SuspendChoice | None = None, link_remaps: asyncio.Lock | None = None,
                 first_pid: int | None = None):
        self.name = name
        self.events = events if events is not None else Events()
        self.state = State.STOPPED
        self.cgroup = cgroup
        self.cuda = cuda or cudamod.SuspendChoice((config.checkpoint or CheckpointConfig()).cuda_checkpoint_path)
        self.link_remaps = link_remaps or asyncio.Lock()  # shared by the daemon's models (checkpoint.py)
        self.sleep_level: int | None = None  # the vLLM sleep level the weights are at
        self.last_error: str | None = None
        self.escalations = 0  # evictions that failed and fell back to stop
        self.restore_failures = 0  # restores that failed (then cold-started)
        self.last_wake_secs: float | None = None
        self.last_wake_kind: str | None = None
        self.last_sleep_secs: float | None = None
        self.awake_since: float | None = None  # monotonic
        self._finishing: asyncio.Task | None = None  # an eviction finishing in the background
        self._waking: Timed | None = None  # the wake in progress (its kind changes if it falls back)
        self._next_config: Config | None = None  # settings a reload changed, for the next tree
        self._build(config, first_pid)
        self.state = self._discover()

    def _build(self, config: Config, first_pid: int | None) -> None:
        """What the model's settings make: its backend, checkpointer and eviction strategies."""
        self.config = config
        self.port = config.models[self.name].port
        self.eviction = config.eviction_for(self.name)
        self.checkpoint_config = ck = config.checkpoint or CheckpointConfig()
        self.backend = VllmBackend(self.name, config, self._backend_exited, self.cgroup, first_pid)
        self.checkpointer = Checkpointer(self.name, config.checkpoint_dir_for(self.name), Criu(ck.criu_path),
                                         self.cgroup, Path(config.log_dir) / "criu" / self.name, cuda=self.cuda,
                                         settings=Settings.of(config), on_step=self.step)
        self.checkpoint = Checkpoint(self, self.checkpointer, ck.keep_images, self.link_remaps)
        strategies: list[ProcessEviction] = [KeepRunning(self), Stop(self), CudaSuspend(self), self.checkpoint]
        #: The eviction the config asks for, and the strategy that resumes from each resting state.
        self.process = next(s for s in strategies if s.kind is self.eviction.process)
        self._resumes = {s.resting: s for s in strategies}

    def _discover(self) -> State:
        """The state a valid checkpoint made with this model's command line gives: checkpointed;
        one that cannot be used is counted in llmuxd_restore_failures_total{reason} and said in
        last_error; one made with another command line (its settings changed since) is left for
        the next dump to replace."""
        found = self.checkpointer.discover()
        if found.state == "valid":
            if why := self.checkpoint.made_otherwise(found):
                log.info("%s: %s: not restored; the model cold-starts and its next checkpoint replaces it",
                         self.name, why, extra={"MODEL": self.name, "EVENT": "discover"})
                return State.STOPPED
            return State.CHECKPOINTED
        if found.state != "none":
            self.last_error = found.detail
            self.restore_failures += 1
            self.events.restore_failed(self.name, found.reason)
        return State.STOPPED

    @property
    def last_checkpoint(self) -> DumpRecord | ReusedCheckpoint | None:
        return self.checkpoint.last_dump

    @property
    def last_restore(self) -> RestoreRecord | None:
        return self.checkpoint.last_restore

    # -- state ------------------------------------------------------------------------------
    def set_state(self, new: State) -> None:
        old, self.state = self.state, new
        if new is State.AWAKE:
            self.awake_since = time.monotonic()
        if old is not new:
            log.info("%s: %s -> %s", self.name, old.value, new.value, extra={"MODEL": self.name, "EVENT": "state"})
            self.events.state_changed(self.name, old, new)

    def phase(self, name: str, kind: str) -> contextlib.AbstractContextManager[Timed]:
        """Run the body as phase ``name`` of a transition (see :mod:`llmuxd.events`)."""
        return phase(self.events, self.name, name, kind)

    def step(self, name: str) -> None:
        """The phase in progress reached step ``name``."""
        self.events.step(self.name, name)

    def _backend_exited(self, code: int) -> None:
        msg = f"backend exited unexpectedly with code {code}"
        if self.state in (State.AWAKE, State.ASLEEP, State.SUSPENDED):
            self.note_error(msg, self.backend.output_tail(), event="backend_exit")
            self._tree_gone()
            self.set_state(State.STOPPED)
        else:  # STARTING, WAKING, SLEEPING, ...: the transition in progress fails and says why
            self.note_error(msg, event="backend_exit")

    def status(self) -> ModelStatus:
        running = self.backend.running
        return ModelStatus(
            name=self.name, state=self.state.value,
            eviction=EvictionPolicy(weights=self.eviction.weights.value, process=self.eviction.process.value),
            port=self.port, pid=self.backend.tree.root_pid if running else None,
            cgroup=str(self.cgroup.path) if self.cgroup is not None else None,
            pids=self.backend.pids() if self.state is not State.STOPPED else [],
            last_wake_secs=self.last_wake_secs, last_wake_kind=self.last_wake_kind,
            last_sleep_secs=self.last_sleep_secs, last_error=self.last_error, escalations=self.escalations,
            restore_failures=self.restore_failures, checkpoint_path=str(self.checkpointer.path),
            restart_pending=self.restart_pending,
            last_checkpoint=self.last_checkpoint, last_restore=self.last_restore,
        )

    def output_source(self) -> Source:
        """The tree's output file, for the daemon to forward (see logfollow.py)."""
        return self.backend.output_source()

    def note_error(self, msg: str, output: Sequence[str] | None = None, *, event: str = "error") -> None:
        """Record and log a failure.  ``output``: the tree's last lines that explain it
        (``backend.output_tail()``), shown under it in ``last_error`` and in the log (none: the
        message says where the tree's output is)."""
        if output is not None:
            msg = modellog.described(msg, self.backend.log_path, list(output))
        self.last_error = msg
        head, *lines = msg.split("\n")
        log.error("%s: %s", self.name, head, extra={"MODEL": self.name, "EVENT": event, "output": lines})

    def restore_failed(self, msg: str, reason: str, output: Sequence[str] | None = None) -> None:
        """A restore failed (what was restored is gone); the model is stopped."""
        self.note_error(msg, output)
        self.restore_failures += 1
        self.events.restore_failed(self.name, reason)
        self.set_state(State.STOPPED)

    def cuda_suspender(self) -> cudamod.CudaCheckpointer:
        return self.cuda.require("the model holds", NotSupported)

    # -- transitions ---------------------------------------------------------------------------
    async def adopt(self, pids: list[int]) -> bool:
        """Take over a tree of this model left running by an earlier llmuxd (found in the
        model's cgroup).  Adopted when its server answers as this model; otherwise killed.
        Returns whether it was adopted."""
        members = set(pids)
        # A tree in its own PID namespace: its root is the namespace's init (inner PID 1),
        # not the `unshare` that launched it.
        inits = [p for p in pids if procfs.inner_pid(p) == 1 and p != 1]
        roots = inits or [p for p in pids if _parent(p) not in members]
        probe = await self.backend.probe() if len(roots) == 1 else None
        if probe is None or self.backend.served_name not in probe["served"]:
            why = "no single root" if len(roots) != 1 else "its server does not answer as this model"
            log.warning("%s: found a stray tree %s (%s); stopping it", self.name, pids, why,
                        extra={"MODEL": self.name, "EVENT": "stray"})
            if self.cgroup is not None:
                await self.cgroup.kill()
            return False
        self.backend.adopt(roots[0])
        # Asleep at an unknown level: assume 2 (reloading weights that are there is only slower).
        self.sleep_level = 2 if probe["sleeping"] else None
        self.set_state(State.ASLEEP if probe["sleeping"] else State.AWAKE)
        log.info("%s: adopted running tree (root pid %d, %s)", self.name, roots[0], self.state.value,
                 extra={"MODEL": self.name, "EVENT": "adopt"})
        return True

    async def settled(self) -> None:
        """Wait until an eviction finishing in the background (a dump) has ended."""
        if self._finishing is not None:
            await asyncio.shield(self._finishing)

    async def wake(self) -> float:
        """Make the model serve; returns the transition's duration (0 if it was awake)."""
        await self.settled()
        if self.state is State.AWAKE:
            return 0.0
        if self._next_config is not None:  # awake with old settings when they changed, then its tree died
            await self._renew()
        strategy = self._resumes.get(self.state, self._resumes[State.STOPPED])
        if problems := strategy.resume_problems():  # refused, nothing touched: it stays where it rests
            msg = "; ".join(problems)
            self.last_error = msg
            raise TransitionError(msg)
        try:
            with self.phase("wake", strategy.expected_kind()) as self._waking:
                self._waking.kind = await strategy.resume()
            self.last_wake_secs, self.last_wake_kind = self._waking.secs, self._waking.kind
        finally:
            self._waking = None
        self.set_state(State.AWAKE)
        return self.last_wake_secs

    async def cold_start(self) -> None:
        """Start a new tree and wait until it serves; raises TransitionError (stopped) if not."""
        self.set_state(State.STARTING)
        self.sleep_level = None
        if self._waking is not None and self._waking.kind != "cold_start":  # another way failed
            self._waking.kind = "cold_start"
            self.events.phase_started(self.name, "wake", "cold_start")
        try:
            self.step("spawn")
            await self.checkpoint.new_tree()
            await self.backend.start()
            self.step("load")
            await self.backend.wait_ready(self.config.startup_timeout_for(self.name))
        except (BackendError, OSError) as e:
            await self.stop_backend()  # first: all it wrote is in its file then
            self.note_error(f"cold start failed: {e}", self.backend.output_tail())
            raise TransitionError(self.last_error) from None

    async def wake_weights(self) -> None:
        """The weights' wake sequence.  By what was done to the weights (a checkpoint may come
        from another policy), not by the current policy: after level 2 the weights must be
        reloaded or vLLM answers garbage."""
        if self.sleep_level is not None:
            self.step("wake_sequence")
            await self.backend.wake_up()
            if self.sleep_level >= 2:
                await self.backend.reload_weights()
                await self.backend.reset_prefix_cache()
            self.sleep_level = None

    async def sleep(self, *, background: bool = False, start_after: asyncio.Event | None = None) -> float:
        """Evict per the model's policy: the weights step, then the process strategy's; any
        failing step escalates to stop.  Returns the duration (0 if there was nothing to do).
        ``background``: return once the GPU is free and let the rest (a checkpoint's dump)
        finish on its own (state ``dumping`` until then), once ``start_after`` is set if given
        (a switch lets the next model's restore go first)."""
        if self.state is not State.AWAKE:
            return 0.0
        if self._next_config is not None:
            log.info("%s: evicted by stopping it: a reload changed its settings, its next wake starts it with "
                     "them", self.name, extra={"MODEL": self.name, "EVENT": "evict"})
            with self.phase("sleep", "stop") as timed:  # (the kind of an eviction by stopping)
                self.step("stop")
                await self._renew()
            self.last_sleep_secs = timed.secs
            return self.last_sleep_secs
        self.set_state(State.SLEEPING)
        with self.phase("sleep", self.eviction.process.value) as timed:
            try:
                await self.process.before_weights()
                level = self.eviction.weights.sleep_level
                if level is not None:
                    self.step("weights")
                    await self.backend.sleep(level)
                    self.sleep_level = level
                if not self.backend.running:
                    raise BackendError("backend exited during eviction")
                resting = await self.process.evict(background=background)
            except EVICTION_ERRORS as e:
                resting, timed.kind = await self._escalate(e), ESCALATED
        self.last_sleep_secs = timed.secs
        log.info("%s: evicted (%s) in %.3f s%s", self.name, self.eviction, self.last_sleep_secs,
                 "; the dump goes on in the background" if resting is State.DUMPING else "",
                 extra={"MODEL": self.name, "EVENT": "evict", "DURATION_S": f"{self.last_sleep_secs:.3f}"})
        self.set_state(resting)
        if resting is State.DUMPING:
            self._finishing = asyncio.create_task(self._finish_eviction(start_after), name=f"dump {self.name}")
        return self.last_sleep_secs

    async def _finish_eviction(self, start_after: asyncio.Event | None) -> None:
        try:
            with self.phase("dump", self.eviction.process.value) as timed:
                try:
                    if start_after is not None and not start_after.is_set():
                        self.step("wait")  # until the next model's restore has gone first
                        await start_after.wait()
                    resting = await self.process.finish()
                except EVICTION_ERRORS as e:
                    resting, timed.kind = await self._escalate(e), ESCALATED
        except BaseException as e:  # noqa: BLE001 - never left dumping: the tree goes, the GPU stays free
            self.note_error(f"background dump interrupted ({type(e).__name__}: {e}); stopping the tree")
            await asyncio.shield(self.stop_backend())
            raise
        finally:
            self._finishing = None
        secs = timed.secs
        log.info("%s: background dump ended in %.3f s (%s)", self.name, secs, resting.value,
                 extra={"MODEL": self.name, "EVENT": "dump", "DURATION_S": f"{secs:.3f}"})
        self.set_state(resting)

    async def _escalate(self, e: Exception) -> State:
        self.note_error(f"eviction {self.eviction} failed: {e}; escalated to stop to free the GPU")
        self.escalations += 1
        self.events.escalated(self.name, str(e))
        self.step("stop")
        await self.stop_backend()
        return State.STOPPED

    async def stop(self) -> None:
        await self.settled()
        if self.state in (State.STOPPED, State.CHECKPOINTED) and not self.backend.pids():
            return
        self.set_state(State.STOPPING)
        await self.stop_backend()

    async def stop_backend(self) -> None:
        await self.stop_tree()
        self.set_state(State.STOPPED)

    async def stop_tree(self, grace_secs: float = 10.0) -> None:
        await self.backend.stop(grace_secs)
        self._tree_gone()

    def _tree_gone(self) -> None:
        self.sleep_level = None
        for strategy in self._resumes.values():
            strategy.tree_gone()

    async def close(self) -> None:
        await self.settled()
        await self.backend.close()

    # -- reload ------------------------------------------------------------------------------------
    @property
    def restart_pending(self) -> bool:
        return self._next_config is not None

    def use_config(self, config: Config) -> None:
        """A reload left this model's settings as they run: the same ones, read from ``config``
        (a change an earlier reload left pending is dropped)."""
        self._next_config = None
        self.config = self.backend.config = config
        self.backend.cfg = config.models[self.name]

    async def reconfigure(self, config: Config) -> None:
        """A reload changed this model's settings.  Awake, it keeps serving with the old ones
        until its next eviction, which stops it; a tree that is not awake (asleep, suspended) is
        stopped now.  Without a tree the new settings apply at once, and the next wake starts the
        model with them (a checkpoint made with another command line is not restored)."""
        self._next_config = config
        await self.settled()  # a dump in progress ends first
        if self.state is not State.AWAKE:
            await self._renew()

    async def _renew(self) -> None:
        await self.stop()
        config, self._next_config = self._next_config, None
        await self.backend.close()
        self._build(config, self.backend.tree.first_pid)
        self.set_state(self._discover())
        log.info("%s: new settings in force (%s, eviction %s)", self.name, redact.command_line(self.backend.argv()),
                 self.eviction, extra={"MODEL": self.name, "EVENT": "reconfigure"})


def _parent(pid: int) -> int | None:
    st = procfs.stat(pid)
    return st.ppid if st else None
