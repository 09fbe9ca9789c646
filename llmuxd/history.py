"""The recent transitions, kept in memory (bounded) from the controller's events: each switch
as a whole, and each model's own steps (cold start, wake, restore, sleep, dump, ...) with their
kind, start, duration and outcome.  ``/control/status`` shows them (``recent_transitions``)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from .events import Listener, State
from .status import TransitionRecord

#: How many finished transitions are kept.
KEEP = 64

#: The transitional states, and the step each one is (by the resting state it left).
_STEPS = {State.STARTING: "cold_start", State.RESTORING: "restore", State.SLEEPING: "sleep",
          State.STOPPING: "stop", State.DUMPING: "dump"}
_WAKES = {State.ASLEEP: "wake", State.SUSPENDED: "cuda_resume"}
#: Steps that succeed only when the model ends awake.
_TO_AWAKE = frozenset({"cold_start", "wake", "cuda_resume", "restore"})


@dataclass
class _Open:
    kind: str
    started_at: float  # Unix time
    started: float  # monotonic
    failed: bool = False


def _now() -> tuple[float, float]:
    return time.time(), time.monotonic()


class TransitionHistory(Listener):
    def __init__(self, keep: int = KEEP):
        self._done: deque[TransitionRecord] = deque(maxlen=keep)
        self._steps: dict[str, _Open] = {}  # model -> its step in progress
        self._switch: tuple[str | None, str, _Open] | None = None

    def recent(self) -> list[TransitionRecord]:
        """The finished transitions, oldest first."""
        return list(self._done)

    def _finish(self, model: str, step: _Open, ok: bool, state: str | None = None,
                from_model: str | None = None) -> None:
        self._done.append(TransitionRecord(
            kind=step.kind, model=model, from_model=from_model, started_at=round(step.started_at, 3),
            duration_secs=round(time.monotonic() - step.started, 4), ok=ok, state=state))

    # -- events ------------------------------------------------------------------------------
    def state_changed(self, model: str, old: State, new: State) -> None:
        step = self._steps.pop(model, None)
        if step is not None:
            ok = not step.failed and (new is State.AWAKE if step.kind in _TO_AWAKE else True)
            self._finish(model, step, ok, new.value)
        elif new is State.STOPPED and old in (State.AWAKE, State.ASLEEP, State.SUSPENDED):
            self._finish(model, _Open("exited", *_now()), False, new.value)
        kind = _STEPS.get(new) or (_WAKES.get(old, "wake") if new is State.WAKING else None)
        if kind is not None:
            self._steps[model] = _Open(kind, *_now())

    def escalated(self, model: str, reason: str) -> None:
        if (step := self._steps.get(model)) is not None:
            step.failed = True

    def restore_failed(self, model: str, reason: str) -> None:
        self.escalated(model, reason)

    def active_changed(self, active: str | None, switching: tuple[str | None, str] | None) -> None:
        if self._switch is not None and switching != self._switch[:2]:
            previous, target, step = self._switch
            self._switch = None
            self._finish(target, step, active == target, from_model=previous)
        if switching is not None and self._switch is None:
            self._switch = (switching[0], switching[1], _Open("switch", *_now()))
