"""Transitions as jobs, the way systemd's ``StartUnit`` works: ``StartWake``/``StartSleep``
queue the transition and return at once with the object path of a job
(``/io/llmux/Llmuxd1/job/<id>``, interface ``io.llmux.Llmuxd1.Job``), which stays on the bus
while the transition is queued or running; ``JobNew`` announces it, ``JobRemoved`` tells its
result when it ends and the object is gone.  The transition itself is the Switcher's, in the
same queue as every other; this module only follows its outcome.

Results: ``done`` (the transition completed: the model's state is in ``Inspect`` and
``ModelStateChanged``), ``failed`` (it did not; the model's ``last_error`` says why),
``canceled`` (llmuxd stopped first)."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Awaitable

from dbus_fast.aio import MessageBus
from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_property

from ...errors import ShuttingDown
from ...status import Transition

if TYPE_CHECKING:
    from .interface import Llmuxd1

log = logging.getLogger(__name__)

JOB_INTERFACE = "io.llmux.Llmuxd1.Job"
JOB_PATH = "/io/llmux/Llmuxd1/job"
DONE, FAILED, CANCELED = "done", "failed", "canceled"
_CONST = "org.freedesktop.DBus.Property.EmitsChangedSignal"


class Job(ServiceInterface):
    """``io.llmux.Llmuxd1.Job``: one queued or running transition (read-only, constant)."""

    def __init__(self, id_: int, job_type: str, model: str):
        super().__init__(JOB_INTERFACE)
        self.id = id_
        self.job_type = job_type
        self.model = model
        self.path = f"{JOB_PATH}/{id_}"

    @dbus_property(access=PropertyAccess.READ)
    def Id(self) -> "u":  # noqa: F821, N802 - D-Bus signatures and names
        return self.id

    @dbus_property(access=PropertyAccess.READ)
    def Model(self) -> "s":  # noqa: F821, N802
        return self.model

    @dbus_property(access=PropertyAccess.READ)
    def JobType(self) -> "s":  # noqa: F821, N802
        return self.job_type

    for _prop in (Id, Model, JobType):
        _prop.introspection.annotations[_CONST] = "const"
    del _prop


class Jobs:
    """The jobs of one exported ``Llmuxd1``: each exported on the bus while its transition is
    queued or running, announced with ``JobNew`` and ``JobRemoved``."""

    def __init__(self, iface: Llmuxd1):
        self.iface = iface
        self._bus: MessageBus | None = None
        self._last_id = 0
        self._running: dict[asyncio.Task, Job] = {}

    def attach(self, bus: MessageBus) -> None:
        self._bus = bus

    def detach(self) -> None:
        """The bus is gone: stop following (the transitions themselves go on)."""
        self._bus = None
        for task in list(self._running):
            task.cancel()

    def start(self, job_type: str, model: str, outcome: Awaitable[Transition]) -> str:
        """Export a job for ``outcome`` (already queued) and return its object path."""
        if self._bus is None:
            raise ShuttingDown("llmuxd's D-Bus connection is closing")
        self._last_id = self._last_id % 0xFFFFFFFF + 1
        job = Job(self._last_id, job_type, model)
        self._bus.export(job.path, job)
        task = asyncio.ensure_future(self._follow(job, outcome))
        self._running[task] = job
        self._emit(self.iface.JobNew, job.id, job.path, model)
        return job.path

    async def _follow(self, job: Job, outcome: Awaitable[Transition]) -> None:
        result = FAILED
        try:
            await outcome
            result = DONE
        except (asyncio.CancelledError, ShuttingDown):
            result = CANCELED
        except Exception as e:  # noqa: BLE001 - the switcher logged it; the job says "failed"
            log.info("D-Bus job %d (%s %s) failed: %s", job.id, job.job_type, job.model, e)
        finally:
            self._running.pop(asyncio.current_task(), None)
            bus = self._bus
            if bus is not None:
                try:
                    bus.unexport(job.path, job)
                except Exception:  # noqa: BLE001 - already gone with the connection
                    pass
                self._emit(self.iface.JobRemoved, job.id, job.path, job.model, result)

    @staticmethod
    def _emit(signal, *args) -> None:
        try:
            signal(*args)
        except Exception:  # noqa: BLE001 - a lost signal must not break a job
            log.exception("D-Bus: could not emit %s", signal.__name__)
