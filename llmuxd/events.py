"""What the controller tells those who watch it: a model's states and the :class:`Listener`
that receives every change (metrics, D-Bus signals, sd_notify ``STATUS=``).

A leaf module: models and the switcher emit these events, the transports and metrics receive
them, and neither side needs to import the other for it."""

from __future__ import annotations

from enum import Enum


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

    def phase_done(self, model: str, phase: str, seconds: float, kind: str) -> None:
        """A phase of a transition ended.  ``wake``: ``kind`` says how the model came to serve
        (``cold_start``, ``wake``, ``resume`` of suspended CUDA state, ``restore`` from a
        checkpoint: its ``last_wake_kind``).  ``drain``, ``sleep``, ``dump`` of an eviction:
        ``kind`` is its process strategy (``keep_running``, ``cuda_suspend``, ``checkpoint``,
        ``stop``), or :data:`ESCALATED` when a step failed and the model was stopped instead."""

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

    def phase_done(self, model: str, phase: str, seconds: float, kind: str) -> None:
        for listener in self.listeners:
            listener.phase_done(model, phase, seconds, kind)

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
