"""Where each model's transition is: the phase (and its kind) and step in progress, since when,
and how long that phase of that kind (and that step) typically takes for that model — the
median of its last few that completed, kept in memory.  Fed by the models' and the switcher's events (:mod:`.events`),
read by the status (``ModelStatus.progress``) and watched, event by event, by the control API's
live stream (``GET /control/events``) and the offline commands' progress display."""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from .events import Listener
from .status import Progress, ProgressEvent

log = logging.getLogger(__name__)

#: How many completed durations of each phase (and step) of a model the typical is taken from.
KEEP = 5

Watcher = Callable[[ProgressEvent], None]


@dataclass
class _Open:
    phase: str
    kind: str
    started: float  # monotonic
    step: str | None = None
    step_started: float = 0.0


class Tracker(Listener):
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.seq = 0  # events emitted so far
        self._open: dict[str, _Open] = {}
        self._done: dict[tuple[str, ...], deque[float]] = {}  # (model, phase, kind[, step]) -> last durations
        self._watchers: list[Watcher] = []

    # -- reading ------------------------------------------------------------------------------
    def typical(self, model: str, phase: str, kind: str, step: str | None = None) -> float | None:
        done = self._done.get((model, phase, kind) if step is None else (model, phase, kind, step))
        return round(statistics.median(done), 3) if done else None

    def of(self, model: str) -> Progress | None:
        """``model``'s transition in progress, or None."""
        o = self._open.get(model)
        return None if o is None else self._progress(model, o, self.clock() - o.started)

    def current(self) -> dict[str, Progress]:
        """Every model with a transition in progress."""
        return {model: p for model in list(self._open) if (p := self.of(model)) is not None}

    def _progress(self, model: str, o: _Open, elapsed: float, with_step: bool = True) -> Progress:
        step = o.step if with_step else None
        return Progress(
            phase=o.phase, kind=o.kind, elapsed_secs=round(elapsed, 3),
            typical_secs=self.typical(model, o.phase, o.kind),
            step=step, step_elapsed_secs=round(self.clock() - o.step_started, 3) if step else None,
            step_typical_secs=self.typical(model, o.phase, o.kind, step) if step else None,
        )

    # -- watching -----------------------------------------------------------------------------
    def watch(self, watcher: Watcher) -> Callable[[], None]:
        """Call ``watcher`` with every event from now on (on the event loop; it must not block);
        returns what stops it."""
        self._watchers.append(watcher)
        return lambda: self._watchers.remove(watcher) if watcher in self._watchers else None

    def in_progress(self) -> list[ProgressEvent]:
        """The phases running now, as ``in_progress`` events (what a new watcher is told first)."""
        return [self._event("in_progress", model, p, count=False) for model, p in self.current().items()]

    def _event(self, kind: str, model: str, progress: Progress, count: bool = True) -> ProgressEvent:
        self.seq += count
        return ProgressEvent(event=kind, seq=self.seq, time=round(time.time(), 3), model=model, progress=progress)

    def _emit(self, kind: str, model: str, progress: Progress) -> None:
        event = self._event(kind, model, progress)
        for watcher in list(self._watchers):
            try:
                watcher(event)
            except Exception:  # noqa: BLE001 - a watcher never breaks a transition
                log.exception("progress watcher failed")

    # -- the events ---------------------------------------------------------------------------
    def _record(self, key: tuple[str, ...], secs: float) -> None:
        self._done.setdefault(key, deque(maxlen=KEEP)).append(secs)

    def _end_step(self, model: str, o: _Open) -> None:
        if o.step is not None:
            self._record((model, o.phase, o.kind, o.step), self.clock() - o.step_started)

    def phase_started(self, model: str, phase: str, kind: str) -> None:
        o = self._open.get(model)
        if o is not None and o.phase == phase:  # announced again: its kind changed (a wake's fallback)
            o.kind, o.step = kind, None
        else:
            o = self._open[model] = _Open(phase, kind, self.clock())
        self._emit("phase_started", model, self._progress(model, o, self.clock() - o.started))

    def step(self, model: str, step: str) -> None:
        o = self._open.get(model)
        if o is None:
            return
        self._end_step(model, o)
        o.step, o.step_started = step, self.clock()
        self._emit("step", model, self._progress(model, o, o.step_started - o.started))

    def phase_done(self, model: str, phase: str, seconds: float, kind: str) -> None:
        o = self._open.get(model)
        if o is not None and o.phase == phase:
            if o.kind == kind:  # (the steps of a wake that went another way are not that way's)
                self._end_step(model, o)
            del self._open[model]
        self._record((model, phase, kind), seconds)
        self._emit("phase_done", model, self._progress(model, _Open(phase, kind, 0.0), seconds, with_step=False))

    def model_removed(self, model: str) -> None:
        """A reload removed ``model``: what was kept of it goes."""
        self._open.pop(model, None)
        for key in [k for k in self._done if k[0] == model]:
            del self._done[key]

    def phase_failed(self, model: str, phase: str, seconds: float) -> None:
        o = self._open.get(model)
        if o is None or o.phase != phase:
            return
        del self._open[model]
        self._emit("phase_failed", model, self._progress(model, o, seconds))
