"""Per-model state machine: cold start, wake, sleep (the two eviction axes), stop.

The orchestrator knows nothing about requests or other models; the switcher decides *when*,
the orchestrator does *how*, one transition at a time per model (the switcher serializes them).
"""

from __future__ import annotations

import logging
import time
from enum import Enum

from .backends.vllm import BackendError, VllmBackend
from .config import Config, ProcessEviction, WeightsEviction
from .errors import NotSupported
from .isolation.cgroups import Cgroup

log = logging.getLogger(__name__)


class State(str, Enum):
    STOPPED = "stopped"  # no process; next wake is a cold start
    STARTING = "starting"
    AWAKE = "awake"  # serving
    SLEEPING = "sleeping"
    ASLEEP = "asleep"  # process alive, evicted per its weights axis
    WAKING = "waking"
    STOPPING = "stopping"


class Listener:
    """Receives the controller's events (metrics, D-Bus signals, sd_notify STATUS).  Override
    what you need; callbacks run on the event loop and must not block."""

    def state_changed(self, model: str, old: State, new: State) -> None:
        pass

    def phase_done(self, model: str, phase: str, seconds: float) -> None:
        pass

    def escalated(self, model: str, reason: str) -> None:
        pass

    def active_changed(self, active: str | None, switching: tuple[str | None, str] | None) -> None:
        """The active model or the switch in progress changed."""


class TransitionError(Exception):
    """A transition failed; the model is left in a resting state (``STOPPED`` when escalated)."""


class Model:
    def __init__(self, name: str, config: Config, listeners: list[Listener], cgroup: Cgroup | None = None):
        self.name = name
        self.config = config
        self.eviction = config.eviction_for(name)
        self.listeners = listeners
        self.state = State.STOPPED
        self.cgroup = cgroup
        self.backend = VllmBackend(name, config, self._backend_exited, cgroup)
        self.last_error: str | None = None
        self.last_wake_secs: float | None = None
        self.last_wake_kind: str | None = None
        self.last_sleep_secs: float | None = None
        self.awake_since: float | None = None  # monotonic
        self._weights_evicted = False

    # -- state ------------------------------------------------------------------------------
    def _set(self, new: State) -> None:
        old, self.state = self.state, new
        if new is State.AWAKE:
            self.awake_since = time.monotonic()
        if old is not new:
            log.info("%s: %s -> %s", self.name, old.value, new.value, extra={"MODEL": self.name, "EVENT": "state"})
            for listener in self.listeners:
                listener.state_changed(self.name, old, new)

    def _phase(self, phase: str, started: float) -> float:
        secs = time.monotonic() - started
        for listener in self.listeners:
            listener.phase_done(self.name, phase, secs)
        return secs

    def _backend_exited(self, code: int) -> None:
        msg = f"backend exited unexpectedly with code {code}; see {self.backend.log_path}"
        log.error("%s: %s", self.name, msg, extra={"MODEL": self.name, "EVENT": "backend_exit"})
        self.last_error = msg
        if self.state in (State.AWAKE, State.ASLEEP):
            self._weights_evicted = False
            self._set(State.STOPPED)
        # In STARTING/WAKING/SLEEPING the transition in progress sees the exit and fails.

    def status(self) -> dict:
        return {
            "name": self.name,
            "state": self.state.value,
            "eviction": {"weights": self.eviction.weights.value, "process": self.eviction.process.value},
            "port": self.config.models[self.name].port,
            "pid": self.backend.tree.root_pid if self.backend.running else None,
            "cgroup": str(self.cgroup.path) if self.cgroup is not None else None,
            "pids": self.backend.pids() if self.state is not State.STOPPED else [],
            "last_wake_secs": self.last_wake_secs,
            "last_wake_kind": self.last_wake_kind,
            "last_sleep_secs": self.last_sleep_secs,
            "last_error": self.last_error,
        }

    # -- transitions ---------------------------------------------------------------------------
    async def adopt(self, pids: list[int]) -> bool:
        """Take over a tree of this model left running by an earlier llmuxd (found in the
        model's cgroup).  Adopted when its server answers as this model; otherwise killed.
        Returns whether it was adopted."""
        members = set(pids)
        roots = [p for p in pids if _parent(p) not in members]
        probe = await self.backend.probe() if len(roots) == 1 else None
        if probe is None or self.backend.served_name not in probe["served"]:
            why = "no single root" if len(roots) != 1 else "its server does not answer as this model"
            log.warning("%s: found a stray tree %s (%s); stopping it", self.name, pids, why,
                        extra={"MODEL": self.name, "EVENT": "stray"})
            if self.cgroup is not None:
                await self.cgroup.kill()
            return False
        self.backend.adopt(roots[0])
        self._weights_evicted = probe["sleeping"]
        self._set(State.ASLEEP if probe["sleeping"] else State.AWAKE)
        log.info("%s: adopted running tree (root pid %d, %s)", self.name, roots[0], self.state.value,
                 extra={"MODEL": self.name, "EVENT": "adopt"})
        return True

    async def wake(self) -> float:
        """Make the model serve; returns the transition's duration (0 if it was awake)."""
        if self.state is State.AWAKE:
            return 0.0
        started = time.monotonic()
        if self.state is State.ASLEEP:
            try:
                self._set(State.WAKING)
                await self._wake_sequence()
                kind = "wake"
            except (BackendError, NotSupported) as e:
                self._note_error(f"wake failed: {e}; stopping it and cold-starting instead")
                await self._stop_backend()
                await self._cold_start()
                kind = "cold_start"
        else:
            await self._cold_start()
            kind = "cold_start"
        self.last_wake_secs = self._phase("wake", started)
        self.last_wake_kind = kind
        self._set(State.AWAKE)
        return self.last_wake_secs

    async def _cold_start(self) -> None:
        self._set(State.STARTING)
        self._weights_evicted = False
        try:
            await self.backend.start()
            await self.backend.wait_ready(self.config.policy.startup_timeout_secs)
        except (BackendError, OSError) as e:
            msg = f"cold start failed: {e}"
            self.last_error = msg
            await self._stop_backend()
            raise TransitionError(msg) from None

    async def _wake_sequence(self) -> None:
        if self.eviction.process is not ProcessEviction.KEEP_RUNNING:
            raise NotSupported(f"waking from process eviction {self.eviction.process.value!r}")
        if self._weights_evicted:
            await self.backend.wake_up()
            if self.eviction.weights is WeightsEviction.DISCARD:
                await self.backend.reload_weights()
                await self.backend.reset_prefix_cache()
            self._weights_evicted = False

    async def sleep(self) -> float:
        """Evict per the model's policy; any failing step escalates to stop.  Returns the
        duration (0 if there was nothing to do)."""
        if self.state is not State.AWAKE:
            return 0.0
        started = time.monotonic()
        self._set(State.SLEEPING)
        try:
            level = self.eviction.weights.sleep_level
            if level is not None:
                await self.backend.sleep(level)
                self._weights_evicted = True
            resting = await self._process_step()
        except (BackendError, NotSupported) as e:
            self._note_error(f"eviction {self.eviction} failed: {e}; escalated to stop to free the GPU")
            for listener in self.listeners:
                listener.escalated(self.name, str(e))
            await self._stop_backend()
            resting = State.STOPPED
        self.last_sleep_secs = self._phase("sleep", started)
        self._set(resting)
        return self.last_sleep_secs

    async def _process_step(self) -> State:
        process = self.eviction.process
        if process is ProcessEviction.KEEP_RUNNING:
            if not self.backend.running:
                raise BackendError("backend exited during eviction")
            return State.ASLEEP
        if process is ProcessEviction.STOP:
            await self._stop_backend()
            return State.STOPPED
        raise NotSupported(f"process eviction {process.value!r} is not available in this build")

    async def stop(self) -> None:
        if self.state is State.STOPPED and not self.backend.pids():
            return
        self._set(State.STOPPING)
        await self._stop_backend()
        self._set(State.STOPPED)

    async def _stop_backend(self) -> None:
        await self.backend.stop()
        self._weights_evicted = False
        self._set(State.STOPPED)

    def _note_error(self, msg: str) -> None:
        self.last_error = msg
        log.error("%s: %s", self.name, msg, extra={"MODEL": self.name, "EVENT": "error"})

    async def close(self) -> None:
        await self.backend.close()


def _parent(pid: int) -> int | None:
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[1])
