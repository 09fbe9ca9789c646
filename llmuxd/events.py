"""What the controller tells those who watch it: a model's states and the :class:`Listener`
that receives every change (metrics, D-Bus signals, sd_notify ``STATUS=``).

A leaf module: models and the switcher emit these events, the transports and metrics receive
them, and neither side needs to import the other for it.

A transition runs as phases, one at a time per model (``phase_started``, then ``phase_done`` or
``phase_failed``; the ``phase`` label of ``llmuxd_switch_phase_seconds``), each of a ``kind``
(see :meth:`Listener.phase_done`), each through steps (``step``; a step ends where the next
begins).  The one vocabulary, with each phase's steps:

* ``drain``: the requests in flight on the model to be evicted finish;
* ``sleep``: the eviction, until the GPU is free: ``canary`` (the answer a restore must give),
  ``weights`` (vLLM's sleep level), ``cuda_suspend``, then for a dump that is not left to the
  background ``criu_dump``, ``manifest``, ``write``, and ``stop`` (the tree ended);
* ``dump``: the rest of a checkpoint eviction, in the background: ``wait`` (while the next
  model's restore goes first), ``criu_dump``, ``manifest``, ``write``, ``stop``;
* ``wake``: of kind ``cold_start``: ``spawn``, ``load`` (until the server answers); ``wake`` or
  ``resume`` (a tree kept running): ``cuda_resume``, ``wake_sequence`` (the weights' wake);
  ``restore``: ``read_manifest``, ``verify_images``, ``prepare``, ``criu_restore``,
  ``amx_right``, ``cuda_resume``, ``health``, ``wake_sequence``, ``canary``.

The steps of a dump and a restore are named as the keys of ``last_checkpoint.seconds`` and
``last_restore.seconds``.  A wake whose first way fails goes on as a cold start: its phase is
announced again (``phase_started``) with the kind ``cold_start``."""

from __future__ import annotations

import contextlib
import time
from enum import Enum
from typing import Iterator


class State(str, Enum):
    STOPPED = "stopped"  # no process; next wake is a cold start
    STARTING = "starting"
    AWAKE = "awake"  # serving
    SLEEPING = "sleeping"
    ASLEEP = "asleep"  # process alive, evicted per its weights axis
    WAKING = "waking"
    STOPPING = "stopping"
    DUMPING = "dumping"  # GPU released; the tree is being checkpointed in the background
    SUSPENDED = "suspended"  # process alive, its CUDA state suspended to host memory
    CHECKPOINTED = "checkpointed"  # no process; a checkpoint to restore from
    RESTORING = "restoring"


#: The ``kind`` of an eviction's phases when a step failed and the model was stopped instead.
ESCALATED = "escalated"


class Listener:
    """Receives the controller's events.  Override what you need; callbacks run on the event
    loop and must not block."""

    def state_changed(self, model: str, old: State, new: State) -> None:
        pass

    def phase_started(self, model: str, phase: str, kind: str) -> None:
        """A phase of a transition began (see :func:`phase`); ``kind``: what it is expected to
        be (a wake's may change: it is then announced again)."""

    def step(self, model: str, step: str) -> None:
        """The phase in progress of ``model`` reached ``step`` (it ends where the next begins)."""

    def phase_done(self, model: str, phase: str, seconds: float, kind: str) -> None:
        """A phase of a transition ended.  ``wake``: ``kind`` says how the model came to serve
        (``cold_start``, ``wake``, ``resume`` of suspended CUDA state, ``restore`` from a
        checkpoint: its ``last_wake_kind``).  ``drain``, ``sleep``, ``dump`` of an eviction:
        ``kind`` is its process strategy (``keep_running``, ``cuda_suspend``, ``checkpoint``,
        ``stop``), or :data:`ESCALATED` when a step failed and the model was stopped instead."""

    def phase_failed(self, model: str, phase: str, seconds: float) -> None:
        """A phase ended in an error (or was cancelled)."""

    def escalated(self, model: str, reason: str) -> None:
        """An eviction failed and fell back to stopping the model."""

    def active_changed(self, active: str | None, switching: tuple[str | None, str] | None) -> None:
        """The active model or the switch in progress changed."""

    def restore_failed(self, model: str, reason: str) -> None:
        """A restore from a checkpoint failed (the model then cold-starts)."""

    def checkpoint_written(self, model: str, image_bytes: int) -> None:
        """A dump wrote a new checkpoint holding ``image_bytes`` bytes of CRIU images."""

    def checkpoint_restored(self, model: str, image_bytes: int) -> None:
        """A restore from a checkpoint holding ``image_bytes`` bytes of CRIU images succeeded."""

    def reload_started(self) -> None:
        """A reload of the configuration began."""

    def reload_done(self, result: str) -> None:
        """A reload ended: ``ok`` (applied), ``refused`` (an invalid file: the running
        configuration stays), ``error`` (it failed while applied)."""

    def model_added(self, model: str, state: State) -> None:
        """A reload added ``model`` (in ``state``: stopped or checkpointed)."""

    def model_removed(self, model: str) -> None:
        """A reload removed ``model`` (its tree is stopped)."""


class Events(Listener):
    """Fans one event out to a list of listeners (shared by the switcher and every model, so a
    listener added later hears every model)."""

    def __init__(self, listeners: list[Listener] | None = None):
        self.listeners = listeners if listeners is not None else []

    def add(self, listener: Listener) -> None:
        self.listeners.append(listener)

    def state_changed(self, model: str, old: State, new: State) -> None:
        for listener in self.listeners:
            listener.state_changed(model, old, new)

    def phase_started(self, model: str, phase: str, kind: str) -> None:
        for listener in self.listeners:
            listener.phase_started(model, phase, kind)

    def step(self, model: str, step: str) -> None:
        for listener in self.listeners:
            listener.step(model, step)

    def phase_done(self, model: str, phase: str, seconds: float, kind: str) -> None:
        for listener in self.listeners:
            listener.phase_done(model, phase, seconds, kind)

    def phase_failed(self, model: str, phase: str, seconds: float) -> None:
        for listener in self.listeners:
            listener.phase_failed(model, phase, seconds)

    def escalated(self, model: str, reason: str) -> None:
        for listener in self.listeners:
            listener.escalated(model, reason)

    def active_changed(self, active: str | None, switching: tuple[str | None, str] | None) -> None:
        for listener in self.listeners:
            listener.active_changed(active, switching)

    def restore_failed(self, model: str, reason: str) -> None:
        for listener in self.listeners:
            listener.restore_failed(model, reason)

    def checkpoint_written(self, model: str, image_bytes: int) -> None:
        for listener in self.listeners:
            listener.checkpoint_written(model, image_bytes)

    def checkpoint_restored(self, model: str, image_bytes: int) -> None:
        for listener in self.listeners:
            listener.checkpoint_restored(model, image_bytes)

    def reload_started(self) -> None:
        for listener in self.listeners:
            listener.reload_started()

    def reload_done(self, result: str) -> None:
        for listener in self.listeners:
            listener.reload_done(result)

    def model_added(self, model: str, state: State) -> None:
        for listener in self.listeners:
            listener.model_added(model, state)

    def model_removed(self, model: str) -> None:
        for listener in self.listeners:
            listener.model_removed(model)


class Timed:
    """How long a :func:`phase` took (set when it ends), and its kind (the body may set it)."""

    def __init__(self, kind: str):
        self.kind = kind
        self.secs = 0.0


@contextlib.contextmanager
def phase(listener: Listener, model: str, name: str, kind: str) -> Iterator[Timed]:
    """Run the body as phase ``name`` of ``model``: ``phase_started``, then ``phase_done`` with
    its duration and kind, or ``phase_failed`` when the body raises (or is cancelled)."""
    timed = Timed(kind)
    listener.phase_started(model, name, kind)
    started = time.monotonic()
    try:
        yield timed
    except BaseException:
        listener.phase_failed(model, name, time.monotonic() - started)
        raise
    timed.secs = time.monotonic() - started
    listener.phase_done(model, name, timed.secs, timed.kind)
