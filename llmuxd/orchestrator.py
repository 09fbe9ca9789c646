"""Per-model state machine: cold start, wake, sleep (the two eviction axes), stop.

The orchestrator knows nothing about requests or other models; the switcher decides *when*,
the orchestrator does *how*, one transition at a time per model (the switcher serializes them).
"""

from __future__ import annotations

import asyncio
import logging
import time
from enum import Enum
from pathlib import Path

from .backends.vllm import BackendError, VllmBackend
from . import cuda as cudamod
from .checkpoint.checkpointer import CheckpointFailed, Checkpointer
from .checkpoint.criu import Criu
from .checkpoint.manifest import DumpFacts
from .checkpoint.store import Settings
from .config import CheckpointConfig, Config, ProcessEviction
from .errors import NotSupported
from .isolation import procfs
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
    SUSPENDED = "suspended"  # process alive, its CUDA state suspended to host memory
    CHECKPOINTED = "checkpointed"  # no process; a checkpoint to restore from
    RESTORING = "restoring"


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

    def restore_failed(self, model: str, reason: str) -> None:
        """A restore from a checkpoint failed (the model then cold-starts)."""


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
        ck = config.checkpoint or CheckpointConfig()
        self.checkpoint_config = ck
        self.checkpointer = Checkpointer(name, config.checkpoint_dir_for(name), Criu(ck.criu_path), cgroup,
                                         Path(config.log_dir) / "criu" / name, settings=Settings.of(config))
        self.last_checkpoint: dict | None = None  # timings and size of the last dump
        self.last_restore: dict | None = None  # timings of the last restore
        self._restored_from: float | None = None  # created_ts of the checkpoint the tree came from
        self._suspended: list[int] = []  # pids whose CUDA state is suspended (cuda_suspend)
        self._suspend_needs: tuple[dict | None, dict] = (None, {})  # GPUs and bytes at suspend
        self.last_error: str | None = None
        self.escalations = 0  # evictions that failed and fell back to stop
        self.restore_failures = 0  # restores that failed (then cold-started)
        self._discover()
        self.last_wake_secs: float | None = None
        self.last_wake_kind: str | None = None
        self.last_sleep_secs: float | None = None
        self.awake_since: float | None = None  # monotonic
        self._sleep_level: int | None = None  # the vLLM sleep level the weights are at

    def _discover(self) -> None:
        """A valid checkpoint makes the model start as checkpointed; one that cannot be used is
        counted in llmuxd_restore_failures_total{reason} and said in last_error."""
        found = self.checkpointer.discover()
        if found.state == "valid":
            self.state = State.CHECKPOINTED
        elif found.state != "none":
            self.last_error = found.detail
            self.restore_failures += 1
            for listener in self.listeners:
                listener.restore_failed(self.name, found.reason)

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
        if self.state in (State.AWAKE, State.ASLEEP, State.SUSPENDED):
            self._sleep_level = None
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
            "escalations": self.escalations,
            "restore_failures": self.restore_failures,
            "checkpoint_path": str(self.checkpointer.path),
            "last_checkpoint": self.last_checkpoint,
            "last_restore": self.last_restore,
        }

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
        self._sleep_level = 2 if probe["sleeping"] else None
        self._set(State.ASLEEP if probe["sleeping"] else State.AWAKE)
        log.info("%s: adopted running tree (root pid %d, %s)", self.name, roots[0], self.state.value,
                 extra={"MODEL": self.name, "EVENT": "adopt"})
        return True

    async def wake(self) -> float:
        """Make the model serve; returns the transition's duration (0 if it was awake)."""
        if self.state is State.AWAKE:
            return 0.0
        started = time.monotonic()
        kind = "cold_start"
        if self.state is State.CHECKPOINTED:
            try:
                await self._restore()
                kind = "restore"
            except CheckpointFailed as e:
                await self._restore_failed(e)
                try:
                    await self._cold_start()
                except TransitionError:  # the kept checkpoint is still the way back
                    if self.checkpointer.found().state == "valid":
                        self._set(State.CHECKPOINTED)
                    raise
        elif self.state in (State.ASLEEP, State.SUSPENDED):
            if problems := self._resume_problems():  # refused, nothing touched: it stays suspended
                msg = "cannot resume CUDA state here: " + "; ".join(problems)
                self.last_error = msg
                raise TransitionError(msg)
            try:
                self._set(State.WAKING)
                await self._resume_cuda()
                await self._wake_sequence()
                kind = "wake"
            except (BackendError, NotSupported, cudamod.CudaError) as e:
                self._note_error(f"wake failed: {e}; stopping it and cold-starting instead")
                await self._stop_backend()
                await self._cold_start()
        else:
            await self._cold_start()
        self.last_wake_secs = self._phase("wake", started)
        self.last_wake_kind = kind
        self._set(State.AWAKE)
        return self.last_wake_secs

    async def _restore(self) -> None:
        """Restore from the checkpoint, then health, wake sequence and canary; any failure
        kills what was restored and raises CheckpointFailed."""
        self._set(State.RESTORING)
        r = await self.checkpointer.restore(self.backend.tree, self.config.models[self.name].port,
                                            self.backend.served_name)
        m = r.manifest
        t = dict(r.seconds)
        try:
            self.backend.watch_restored()
            if m.cuda_pids and self.checkpointer.cuda is None:
                # A fresh daemon (e.g. in a new container) has not chosen its CUDA backend yet.
                try:
                    self.checkpointer.cuda = self._cuda()
                except NotSupported:
                    pass  # resume_cuda says why
            t["cuda_resume"] = await self.checkpointer.resume_cuda(m, self.backend.pids())
            started = time.monotonic()
            await self.backend.wait_ready(self.config.policy.startup_timeout_secs)
            t["health"] = time.monotonic() - started
            started = time.monotonic()
            self._sleep_level = m.sleep_level
            await self._wake_sequence()
            t["wake_sequence"] = time.monotonic() - started
            if m.canary is not None:
                answer = await self.backend.canary()
                if answer != m.canary:
                    raise CheckpointFailed(f"canary answer after restore {answer!r} differs from the one "
                                           f"recorded before the dump {m.canary!r}", reason="canary")
        except Exception as e:  # noqa: BLE001 - a restore fails as CheckpointFailed, never stuck in restoring
            await self.backend.stop(grace_secs=0)
            self.checkpointer.clean_after_failure()
            if isinstance(e, CheckpointFailed):
                raise
            reason = "wake" if isinstance(e, (BackendError, cudamod.CudaError)) else "internal"
            raise CheckpointFailed(f"restored tree did not come up: {e}", reason=reason) from None
        self.last_restore = {"from": str(r.found.path), "created": m.created, "prepared": len(r.prepared),
                             "seconds": {k: round(v, 4) for k, v in t.items()}}
        log.info("%s: restored from %s (%s)", self.name, r.found.path,
                 ", ".join(f"{k} {v:.3f}s" for k, v in t.items()),
                 extra={"MODEL": self.name, "EVENT": "restore", "DURATION_S": f"{sum(t.values()):.3f}"})
        if self.checkpoint_config.keep_images:
            self._restored_from = m.created_ts
        else:
            self.checkpointer.discard()

    async def _restore_failed(self, e: CheckpointFailed) -> None:
        where = self.checkpointer.path
        if e.unusable:
            moved = self.checkpointer.quarantine()
            what = f"checkpoint unusable, moved to {moved}" if moved else "checkpoint unusable"
        else:
            what = f"checkpoint kept at {where}"
        self._note_error(f"restore failed ({e.reason}): {e}; {what}; cold-starting instead")
        self.restore_failures += 1
        for listener in self.listeners:
            listener.restore_failed(self.name, e.reason)
        self._set(State.STOPPED)

    async def _cold_start(self) -> None:
        self._set(State.STARTING)
        self._sleep_level = None
        self._restored_from = None  # a new tree: no checkpoint describes it
        try:
            await asyncio.to_thread(self.checkpointer.release_put_back)
            await self.backend.start()
            await self.backend.wait_ready(self.config.policy.startup_timeout_secs)
        except (BackendError, OSError) as e:
            msg = f"cold start failed: {e}"
            self.last_error = msg
            await self._stop_backend()
            raise TransitionError(msg) from None

    async def _wake_sequence(self) -> None:
        # By what was done to the weights (a checkpoint may come from another policy), not by
        # the current policy: after level 2 the weights must be reloaded or vLLM answers garbage.
        if self._sleep_level is not None:
            await self.backend.wake_up()
            if self._sleep_level >= 2:
                await self.backend.reload_weights()
                await self.backend.reset_prefix_cache()
            self._sleep_level = None

    async def sleep(self) -> float:
        """Evict per the model's policy; any failing step escalates to stop.  Returns the
        duration (0 if there was nothing to do)."""
        if self.state is not State.AWAKE:
            return 0.0
        started = time.monotonic()
        self._set(State.SLEEPING)
        try:
            checkpoint = self.eviction.process is ProcessEviction.CHECKPOINT
            canary = await self.backend.canary() if checkpoint and not self._reusable() else None
            level = self.eviction.weights.sleep_level
            if level is not None:
                await self.backend.sleep(level)
                self._sleep_level = level
            resting = await self._process_step(canary)
        except (BackendError, NotSupported, CheckpointFailed, cudamod.CudaError) as e:
            self._note_error(f"eviction {self.eviction} failed: {e}; escalated to stop to free the GPU")
            self.escalations += 1
            for listener in self.listeners:
                listener.escalated(self.name, str(e))
            await self._stop_backend()
            resting = State.STOPPED
        self.last_sleep_secs = self._phase("sleep", started)
        log.info("%s: evicted (%s) in %.3f s", self.name, self.eviction, self.last_sleep_secs,
                 extra={"MODEL": self.name, "EVENT": "evict", "DURATION_S": f"{self.last_sleep_secs:.3f}"})
        self._set(resting)
        return self.last_sleep_secs

    async def _process_step(self, canary: str | None) -> State:
        process = self.eviction.process
        if not self.backend.running:
            raise BackendError("backend exited during eviction")
        if process is ProcessEviction.KEEP_RUNNING:
            return State.ASLEEP
        if process is ProcessEviction.STOP:
            await self._stop_backend()
            return State.STOPPED
        if process is ProcessEviction.CUDA_SUSPEND:
            gpu_pids = cudamod.gpu_processes(self.backend.pids())
            if gpu_pids:  # no GPU state (CPU backend, no GPU here): nothing to suspend
                self._suspend_needs = (cudamod.gpu_inventory(), cudamod.gpu_bytes_of(gpu_pids))
                self._suspended = await cudamod.suspend_tree(gpu_pids, self._cuda())
            return State.SUSPENDED
        return await self._checkpoint(canary)

    def _reusable(self) -> bool:
        """keep_images: the tree was restored from the checkpoint on disk and has not been
        restarted since, so the images still describe it — llmux's reuse: no new dump."""
        if not (self.checkpoint_config.keep_images and self._restored_from):
            return False
        found = self.checkpointer.found()
        return found.state == "valid" and found.manifest is not None and found.manifest.created_ts == self._restored_from

    async def _checkpoint(self, canary: str | None) -> State:
        if self._reusable():
            log.info("%s: keep_images: reusing the checkpoint it was restored from", self.name,
                     extra={"MODEL": self.name, "EVENT": "checkpoint_reuse"})
            await self._stop_tree()
            self.last_checkpoint = {"reused": True}
            return State.CHECKPOINTED
        self.checkpointer.cuda = self._cuda() if cudamod.gpu_processes(self.backend.pids()) else None
        facts = DumpFacts(model=self.name, eviction=str(self.eviction), served_name=self.backend.served_name,
                          port=self.config.models[self.name].port, argv=self.backend.argv(), canary=canary,
                          sleep_level=self._sleep_level)
        self.backend.expect_exit()  # once dumped, the tree is ended (by us)
        try:
            manifest = await self.checkpointer.dump(self.backend.tree, facts)
        except CheckpointFailed:
            if self.backend.running:  # the dump failed before the end: the tree still serves
                self.backend.unexpect_exit()
            raise
        await self._stop_tree(grace_secs=0)  # dumped and stopped: kill it, wait until all is gone
        self._restored_from = None
        self.last_checkpoint = {"path": str(self.checkpointer.path), "image_bytes": manifest.image_bytes,
                                "saved_files": len(manifest.saved),
                                "seconds": {k: round(v, 4) for k, v in manifest.timings.items()}}
        log.info("%s: checkpointed to %s (%d MiB of images, %d files saved)", self.name, self.checkpointer.path,
                 manifest.image_bytes >> 20, len(manifest.saved),
                 extra={"MODEL": self.name, "EVENT": "checkpoint"})
        return State.CHECKPOINTED

    def _cuda(self) -> "cudamod.CudaCheckpointer":
        if not hasattr(self, "_cuda_checkpointer"):
            self._cuda_checkpointer, why = cudamod.select_checkpointer(self.checkpoint_config.cuda_checkpoint_path)
            log.info("%s: CUDA suspend: %s", self.name, why)
        if self._cuda_checkpointer is None:
            raise NotSupported("the model holds GPU state but no CUDA suspend is available here")
        return self._cuda_checkpointer

    async def _resume_cuda(self) -> None:
        if self._suspended:
            await cudamod.resume_tree(self._suspended, self._cuda())
            self._suspended = []

    def _resume_problems(self) -> list[str]:
        """A resume into too little free GPU memory leaves the process stuck for good: check first."""
        if not self._suspended:
            return []
        recorded, needed = self._suspend_needs
        return cudamod.check_restorable(recorded, needed, cudamod.gpu_inventory())

    async def stop(self) -> None:
        if self.state in (State.STOPPED, State.CHECKPOINTED) and not self.backend.pids():
            return
        self._set(State.STOPPING)
        await self._stop_backend()
        self._set(State.STOPPED)

    async def _stop_backend(self) -> None:
        await self._stop_tree()
        self._set(State.STOPPED)

    async def _stop_tree(self, grace_secs: float = 10.0) -> None:
        await self.backend.stop(grace_secs)
        self._sleep_level = None
        self._suspended = []

    def _note_error(self, msg: str) -> None:
        self.last_error = msg
        log.error("%s: %s", self.name, msg, extra={"MODEL": self.name, "EVENT": "error"})

    async def close(self) -> None:
        await self.backend.close()


def _parent(pid: int) -> int | None:
    st = procfs.stat(pid)
    return st.ppid if st else None
