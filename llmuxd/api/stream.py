"""``GET /control/events``: the transitions' progress as a live ``text/event-stream``.

Read-only, served where ``/control/status`` is and to the same callers.  Each event is one SSE
frame, ``event: <kind>`` and ``data: <ProgressEvent as JSON>`` (``llmuxd.status``); a stream
opens with an ``in_progress`` event per phase already running, and a comment line
(``: keep-alive``) goes out when nothing else did for ``KEEPALIVE_SECS``.

Bounded: at most ``MAX_STREAMS`` streams at a time (more get 429); a reader that falls
``MAX_PENDING`` events behind, or does not take a write within the client timeout, is
disconnected; every stream ends when llmuxd stops."""

from __future__ import annotations

import asyncio
import json
from collections import deque

from aiohttp import web

from ..errors import TooManyRequests
from ..progress import Tracker
from ..status import ProgressEvent

MAX_STREAMS = 32
MAX_PENDING = 1024
KEEPALIVE_SECS = 15.0


def frame(event: ProgressEvent) -> bytes:
    return f"event: {event.event}\ndata: {json.dumps(event.json_dict())}\n\n".encode()


class _Reader:
    """One open stream: the events not yet written, and whether it must end."""

    def __init__(self) -> None:
        self.pending: deque[ProgressEvent] = deque()
        self.wakeup = asyncio.Event()
        self.ending: str | None = None  # why the stream ends, once it must

    def deliver(self, event: ProgressEvent) -> None:
        if self.ending is not None:
            return
        if len(self.pending) >= MAX_PENDING:
            self.end(f"more than {MAX_PENDING} events not taken")
            return
        self.pending.append(event)
        self.wakeup.set()

    def end(self, why: str) -> None:
        self.ending = self.ending or why
        self.wakeup.set()


class EventStream:
    def __init__(self, tracker: Tracker, write_timeout: float):
        self.tracker = tracker
        self.write_timeout = write_timeout
        self._readers: set[_Reader] = set()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if len(self._readers) >= MAX_STREAMS:
            raise TooManyRequests(f"{MAX_STREAMS} event streams are open already; try again later")
        reader = _Reader()
        reader.pending.extend(self.tracker.in_progress())  # and from now on, every event:
        unwatch = self.tracker.watch(reader.deliver)
        self._readers.add(reader)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                               "Cache-Control": "no-cache"})
        try:
            await self._write(request, response, None)
            while True:
                while reader.pending:
                    await self._write(request, response, frame(reader.pending.popleft()))
                if reader.ending is not None:
                    await self._write(request, response, f": closed: {reader.ending}\n\n".encode())
                    break
                reader.wakeup.clear()
                try:
                    await asyncio.wait_for(reader.wakeup.wait(), KEEPALIVE_SECS)
                except TimeoutError:
                    await self._write(request, response, b": keep-alive\n\n")
        except (TimeoutError, ConnectionError):  # a reader that went away or stopped reading
            if request.transport is not None:
                request.transport.abort()
        finally:
            unwatch()
            self._readers.discard(reader)
        return response

    async def _write(self, request: web.Request, response: web.StreamResponse, data: bytes | None) -> None:
        async with asyncio.timeout(self.write_timeout):
            if data is None:
                await response.prepare(request)
            else:
                await response.write(data)

    async def close(self, app: web.Application | None = None) -> None:
        """End every stream (llmuxd is stopping: an open stream would hold the shutdown up)."""
        for reader in list(self._readers):
            reader.end("llmuxd is stopping")
