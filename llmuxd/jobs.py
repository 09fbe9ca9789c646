"""The switcher's transitions as jobs, run one at a time, in arrival order, by one worker task:
control calls, request-driven switches and reloads never interleave, and a job goes on when
whoever asked for it goes away (its ``done`` future is awaited through ``asyncio.shield``)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from .errors import LlmuxdError, ShuttingDown

log = logging.getLogger(__name__)


@dataclass
class Job:
    what: str  # "activate <model>" / "sleep <model>" / "reload"
    run: Callable[[], Awaitable[Any]]
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Jobs:
    def __init__(self) -> None:
        self._queue: asyncio.Queue[Job] = asyncio.Queue()
        self._worker: asyncio.Task | None = None
        self.closing = False

    def start(self) -> None:
        self._worker = asyncio.create_task(self._work(), name="switcher")

    def put(self, what: str, run: Callable[[], Awaitable[Any]]) -> Job:
        if self.closing:
            raise ShuttingDown("llmuxd is shutting down")
        job = Job(what, run)
        self._queue.put_nowait(job)
        return job

    async def close(self) -> None:
        """Take no more jobs, end the one running, fail those waiting."""
        self.closing = True
        if self._worker:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.done.done():
                job.done.set_exception(ShuttingDown("llmuxd is shutting down"))

    async def _work(self) -> None:
        while True:
            job = await self._queue.get()
            try:
                result = await job.run()
            except asyncio.CancelledError:
                job.done.cancel()
                raise
            except Exception as e:  # noqa: BLE001 - every failure goes to the job's waiters
                if not isinstance(e, LlmuxdError):  # (a domain error is logged where it arises)
                    log.exception("%s failed", job.what)
                job.done.set_exception(e)
            else:
                job.done.set_result(result)
            # Nobody may be left waiting on a consumed future without a reference.
            job.done.exception() if job.done.done() and not job.done.cancelled() else None
