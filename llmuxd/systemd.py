"""systemd glue: sd_notify (READY, STATUS, WATCHDOG, STOPPING, RELOADING, EXTEND_TIMEOUT_USEC) and journald.

Everything here is a no-op when llmuxd does not run under systemd."""

from __future__ import annotations

import asyncio
import logging
import os
import time

import sdnotify

from .events import Listener, State

log = logging.getLogger(__name__)


def under_systemd() -> bool:
    return bool(os.environ.get("NOTIFY_SOCKET") or os.environ.get("INVOCATION_ID"))


def stderr_is_journal() -> bool:
    """True when stderr is connected to journald (systemd sets JOURNAL_STREAM=dev:ino)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(2)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class Notifier(Listener):
    """Talks to the service manager; also a controller Listener that keeps STATUS= current."""

    def __init__(self, switcher=None):
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._sd = sdnotify.SystemdNotifier() if self.enabled else None
        self.switcher = switcher
        self._watchdog: asyncio.Task | None = None
        self._last_status = ""

    def send(self, *lines: str) -> None:
        if self._sd is not None:
            self._sd.notify("\n".join(lines))

    def ready(self) -> None:
        self.send("READY=1", f"STATUS={self.summary()}", f"MAINPID={os.getpid()}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping: stopping model trees")

    def reload_started(self) -> None:
        """RELOADING=1 with the time it began (what Type=notify-reload wants too), READY=1 after."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading the configuration")

    def reload_done(self, result: str) -> None:
        self._last_status = self.summary()
        self.send("READY=1", f"STATUS={self._last_status}")

    def extend_timeout(self, seconds: float) -> None:
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    # -- STATUS= -------------------------------------------------------------------------------
    def summary(self) -> str:
        sw = self.switcher
        if sw is None:
            return "starting"
        if sw.switching:
            head = f"switching {sw.switching[0] or '-'} -> {sw.switching[1]}"
        else:
            head = f"active: {sw.active or 'none'}"
        states = ", ".join(f"{n} {m.state.value}" for n, m in sw.models.items())
        return f"{head}; {states}"

    def _update(self) -> None:
        text = self.summary()
        if text != self._last_status:
            self._last_status = text
            self.send(f"STATUS={text}")

    def state_changed(self, model: str, old: State, new: State) -> None:
        self._update()

    def active_changed(self, active, switching) -> None:
        self._update()

    # -- watchdog ----------------------------------------------------------------------------------
    def start_watchdog(self) -> None:
        """Ping WATCHDOG=1 from the event loop itself: a blocked loop stops the pings and
        systemd restarts the service."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not self.enabled or not usec or (pid and int(pid) != os.getpid()):
            return
        interval = int(usec) / 1e6 / 3
        log.info("watchdog: pinging every %.1f s", interval)

        async def ping() -> None:
            while True:
                self.send("WATCHDOG=1")
                await asyncio.sleep(interval)

        self._watchdog = asyncio.create_task(ping(), name="watchdog")

    def stop_watchdog(self) -> None:
        if self._watchdog:
            self._watchdog.cancel()
