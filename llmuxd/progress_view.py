"""Transitions shown as they happen, for the command line: ``llmuxd wake`` and ``sleep`` follow
the daemon's live event stream (``GET /control/events``) while their call runs; ``llmuxd
checkpoint`` shows its own model's events (:class:`llmuxd.progress.Tracker`).

On a terminal one line is redrawn in place — each model's phase and step, elapsed time, and
the phase's typical duration for that model — and each phase that ends stays as a line of its
own.  Otherwise (a pipe, a file, a journal) each event is one timestamped line.  Both go to
stderr, so that stdout holds the command's result alone."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import IO, Callable, Iterator

from pydantic import ValidationError

from .progress import Tracker
from .status import Progress, ProgressEvent

REDRAW_SECS = 0.2


def _secs(v: float) -> str:
    return f"{v:.2f} s" if v < 10 else f"{v:.1f} s"


def _typical(v: float | None) -> str:
    return f" (typical {_secs(v)})" if v is not None else ""


def describe(ev: ProgressEvent) -> str:
    """One event in words, e.g. ``m2 cold_start: load (typical 57.9 s)``."""
    p, head = ev.progress, f"{ev.model} {ev.progress.label}"
    if ev.event == "phase_started":
        return f"{head}{_typical(p.typical_secs)}"
    if ev.event == "step":
        return f"{head}: {p.step}{_typical(p.step_typical_secs)}"
    if ev.event == "phase_done":
        return f"{head} done in {_secs(p.elapsed_secs)}" + (" (escalated to stop)" if p.kind == "escalated" else "")
    if ev.event == "phase_failed":
        return f"{head} failed after {_secs(p.elapsed_secs)}" + (f" (in {p.step})" if p.step else "")
    return running(ev.model, p)


def running(model: str, p: Progress) -> str:
    """A phase in progress, e.g. ``m2 cold_start: load, 12.3 s so far (typical 58.0 s)``."""
    return f"{model} {p.label}{f': {p.step}' if p.step else ''}, {_secs(p.elapsed_secs)} so far{_typical(p.typical_secs)}"


def plain_line(ev: ProgressEvent) -> str:
    """``HH:MM:SS.mmm`` (local time of the event) and the event in words."""
    return time.strftime("%H:%M:%S", time.localtime(ev.time)) + f".{int(ev.time * 1000) % 1000:03d} {describe(ev)}"


class Display:
    """Shows :class:`ProgressEvent`\\ s on ``out``: a live line when ``live`` (default: ``out``
    is a terminal), else one line per event.  ``feed`` may be called from any thread."""

    def __init__(self, out: IO[str], live: bool | None = None):
        self.out = out
        self.live = out.isatty() if live is None else live
        self._lock = threading.Lock()
        self._running: dict[str, tuple[ProgressEvent, float]] = {}  # model -> (last event, received)
        self._shown = False  # a live line is on the screen
        self._closed = False
        self._redrawing = False

    def feed(self, ev: ProgressEvent) -> None:
        with self._lock:
            if self._closed:
                return
            if self.live and not self._redrawing:
                self._redrawing = True
                threading.Thread(target=self._redraw, name="progress", daemon=True).start()
            ended = ev.event in ("phase_done", "phase_failed")
            if ended:
                self._running.pop(ev.model, None)
            else:
                self._running[ev.model] = (ev, time.monotonic())
            if not self.live:
                self._write(plain_line(ev) + "\n")
                return
            if ended:
                self._clear()
                self._write(describe(ev) + "\n")
            self._draw()

    def close(self) -> None:
        with self._lock:
            if not self._closed and self.live:
                self._clear()
            self._closed = True

    # -- the live line (the lock held) --------------------------------------------------------
    def _line(self) -> str:
        now, parts = time.monotonic(), []
        for model, (ev, received) in self._running.items():
            p = ev.progress
            elapsed = p.elapsed_secs + (now - received)
            parts.append(f"{model} {p.label}{f': {p.step}' if p.step else ''} {_secs(elapsed)}"
                         + (f" / typical {_secs(p.typical_secs)}" if p.typical_secs is not None else ""))
        return " | ".join(parts)

    def _draw(self) -> None:
        line = self._line()
        if not line:
            return self._clear()
        try:
            width = os.get_terminal_size(self.out.fileno()).columns or 80
        except (OSError, ValueError, AttributeError):
            width = 80
        self._write("\r\x1b[K" + line[: width - 1])
        self._shown = True

    def _clear(self) -> None:
        if self._shown:
            self._write("\r\x1b[K")
            self._shown = False

    def _write(self, text: str) -> None:
        try:
            self.out.write(text)
            self.out.flush()
        except (OSError, ValueError):  # the terminal went away: nothing more to show
            self._closed = True

    def _redraw(self) -> None:
        while True:
            time.sleep(REDRAW_SECS)
            with self._lock:
                if self._closed:
                    return
                if self._running:
                    self._draw()


class Shown(Tracker):
    """The phases of the models a command runs itself, shown on ``out`` as they happen (the
    listener to give those models; ``close`` when done)."""

    def __init__(self, out: IO[str]):
        super().__init__()
        self.display = Display(out)
        self.watch(self.display.feed)

    def close(self) -> None:
        self.display.close()


# -- following a daemon's event stream -----------------------------------------------------------
class Follower:
    """Reads ``GET /control/events`` (an open response) in a thread and feeds a display."""

    def __init__(self, response: IO[bytes], display: Display):
        self.response = response
        self.display = display
        self.seen = 0  # the highest seq read
        self.ended = False
        self._cond = threading.Condition()
        threading.Thread(target=self._read, name="events", daemon=True).start()

    def _read(self) -> None:
        data: list[bytes] = []
        try:
            while line := self.response.readline():
                line = line.rstrip(b"\r\n")
                if line.startswith(b"data:"):
                    data.append(line[5:].strip())
                elif not line and data:
                    self._event(b"\n".join(data))
                    data = []
        except (OSError, ValueError):
            pass
        finally:
            with self._cond:
                self.ended = True
                self._cond.notify_all()

    def _event(self, data: bytes) -> None:
        try:
            ev = ProgressEvent.model_validate_json(data)
        except ValidationError:
            return  # not an event this llmuxd knows: skipped
        self.display.feed(ev)
        with self._cond:
            self.seen = max(self.seen, ev.seq)
            self._cond.notify_all()

    def caught_up(self, seq: int, timeout: float) -> bool:
        """Wait until every event up to ``seq`` was shown (or the stream ended)."""
        with self._cond:
            return self._cond.wait_for(lambda: self.seen >= seq or self.ended, timeout)


@contextlib.contextmanager
def following(open_events: Callable[[], IO[bytes]], last_seq: Callable[[], int], out: IO[str],
              enabled: bool = True) -> Iterator[None]:
    """Show the daemon's transitions while the body runs (a control call); when it is done,
    show what the daemon told up to then (``last_seq``: its ``event_seq`` now), then stop.
    Without an event stream (an older daemon) the body just runs."""
    try:
        response = open_events() if enabled else None
    except Exception:  # noqa: BLE001 - progress is a nicety; the call itself says what is wrong
        response = None
    if response is None:
        yield
        return
    display = Display(out)
    follower = Follower(response, display)
    try:
        yield
    finally:
        try:
            follower.caught_up(last_seq(), timeout=5)
        except (Exception, SystemExit):  # noqa: BLE001 - the daemon is gone: show what came
            pass
        display.close()
