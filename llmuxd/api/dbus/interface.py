"""The exported object ``io.llmux.Llmuxd1`` (methods, signals, properties; see the package's
docstring), the one mapping of domain errors to D-Bus errors, and who may call what."""

import contextvars
import functools
import logging
import os
from typing import Any, Awaitable, Callable

from dbus_fast import Message, MessageType
from dbus_fast.constants import ErrorType, PropertyAccess
from dbus_fast.errors import DBusError
from dbus_fast.service import ServiceInterface, dbus_property, method, signal

from ...errors import Forbidden, LlmuxdError
from ...events import Listener, State
from ...switcher import Switcher
from .jobs import Jobs

log = logging.getLogger(__name__)

BUS_NAME = "io.llmux.Llmuxd1"
OBJECT_PATH = "/io/llmux/Llmuxd1"
INTERFACE = "io.llmux.Llmuxd1"
ERROR_PREFIX = INTERFACE + ".Error."
INSPECT_SIGNATURE = "sa(ssaussddss)"

# -- errors: the one place where domain errors become D-Bus errors ----------------------------
def to_dbus_error(exc: Exception) -> DBusError:
    """The named D-Bus error a client is told for ``exc``: the domain error's own name, except
    ``Forbidden``, which is the bus's own ``org.freedesktop.DBus.Error.AccessDenied`` (clients
    then see one error whether the bus policy or llmuxd refused them)."""
    if isinstance(exc, Forbidden):
        return DBusError(ErrorType.ACCESS_DENIED, exc.message)
    if isinstance(exc, LlmuxdError):
        return DBusError(ERROR_PREFIX + (exc.dbus_name or type(exc).__name__), exc.message)
    return DBusError(ERROR_PREFIX + "Failed", f"internal error in llmuxd: {type(exc).__name__}: {exc}")


def dbus_errors(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Wrap a D-Bus method handler: domain errors become named D-Bus errors.  Goes *under*
    ``@method()`` (dbus-fast reads the wrapped function's signature through ``__wrapped__``)."""

    @functools.wraps(fn)
    async def handler(*args: Any) -> Any:
        try:
            return await fn(*args)
        except DBusError:
            raise
        except LlmuxdError as e:
            raise to_dbus_error(e) from None
        except Exception as e:
            log.exception("D-Bus %s failed", fn.__name__)
            raise to_dbus_error(e) from None

    return handler


def _secs(value: float | None) -> float:
    return -1.0 if value is None else float(value)


def _switching(value: tuple[str | None, str] | None) -> str:
    return f"{value[0] or ''}->{value[1]}" if value else ""


# -- who is calling -----------------------------------------------------------------------------
#: The method call being dispatched.  dbus-fast hands a method handler only the call's
#: arguments, so the transport adds a message filter (:func:`_note_call`): dbus-fast runs it for
#: every incoming message just before, and in the same synchronous step as, the dispatch that
#: creates the handler's task, and a task starts with a copy of the context it was created in.
#: The handler thus reads its own message here; anything else (no message, another member) is
#: treated as an unknown caller and refused.
_CURRENT_CALL: contextvars.ContextVar[Message | None] = contextvars.ContextVar("llmuxd_dbus_call", default=None)


def _note_call(msg: Message) -> None:
    """The transport's message filter: remember the message dbus-fast is about to dispatch.
    Returns None: the message is not consumed here."""
    _CURRENT_CALL.set(msg if msg.message_type is MessageType.METHOD_CALL else None)
    return None


def privileged_uids() -> frozenset[int]:
    """The callers that may change llmuxd's state over D-Bus: root and llmuxd's own user."""
    return frozenset({0, os.geteuid()})


# -- the exported object ------------------------------------------------------------------------
class Llmuxd1(ServiceInterface):
    """``io.llmux.Llmuxd1``: thin over the Switcher.  ``caller_uid(sender)`` asks the bus for
    the uid of a unique connection name; without it every state-changing call is refused."""

    def __init__(self, switcher: Switcher, caller_uid: Callable[[str], Awaitable[int]] | None = None):
        super().__init__(INTERFACE)
        self.switcher = switcher
        self.caller_uid = caller_uid
        self.jobs = Jobs(self)

    async def _check_caller(self, member: str) -> None:
        """Let a state-changing call through only for root and llmuxd's own user; else raise
        ``Forbidden`` (told to the client as ``org.freedesktop.DBus.Error.AccessDenied``)."""
        msg = _CURRENT_CALL.get()
        uid: int | None = None
        if msg is None or msg.member != member or msg.path != OBJECT_PATH or not msg.sender:
            why = "llmuxd could not tell which message this is"
        elif self.caller_uid is None:
            why = "llmuxd cannot ask the bus who called"
        else:
            try:
                uid = await self.caller_uid(msg.sender)
                why = f"the caller is uid {uid}"
            except Exception as e:  # noqa: BLE001 - whatever went wrong, the caller is unknown
                why = f"the bus could not tell the caller's uid ({e})"
        allowed = privileged_uids()
        if uid is not None and uid in allowed:
            return
        sender = msg.sender if msg is not None else "?"
        log.warning("D-Bus: refused %s from %s: %s", member, sender, why, extra={"EVENT": "dbus_denied"})
        who = " and ".join(f"uid {u}" for u in sorted(allowed))
        raise Forbidden(f"{member} changes llmuxd's state: only {who} may call it; {why}")

    @method()
    @dbus_errors
    async def Wake(self, model: "s") -> "sd":  # noqa: F821, N802 - D-Bus signatures and names
        await self._check_caller("Wake")
        r = await self.switcher.wake(model)
        return [r.state, r.duration_secs]

    @method()
    @dbus_errors
    async def Sleep(self, model: "s") -> "sd":  # noqa: F821, N802
        await self._check_caller("Sleep")
        r = await self.switcher.sleep(model)
        return [r.state, r.duration_secs]

    @method()
    @dbus_errors
    async def StartWake(self, model: "s") -> "o":  # noqa: F821, N802
        await self._check_caller("StartWake")
        return self.jobs.start("wake", model, self.switcher.queue_wake(model))

    @method()
    @dbus_errors
    async def StartSleep(self, model: "s") -> "o":  # noqa: F821, N802
        await self._check_caller("StartSleep")
        return self.jobs.start("sleep", model, self.switcher.queue_sleep(model))

    @method()
    @dbus_errors
    async def Reload(self) -> "asasasasas":  # noqa: F821, N802
        await self._check_caller("Reload")
        r = await self.switcher.reload()
        return [r.added, r.removed, list(r.changed), r.unchanged, r.needs_restart]

    @method()
    @dbus_errors
    async def Inspect(self) -> "sa(ssaussddss)":  # noqa: F821, N802
        st = self.switcher.status()
        models = [
            [
                name, m.state, m.pids, m.eviction.weights, m.eviction.process, _secs(m.last_wake_secs),
                _secs(m.last_sleep_secs), m.last_wake_kind or "", m.last_error or "",
            ]
            for name, m in st.models.items()
        ]
        return [st.active_model or "", models]

    @signal()
    def ModelStateChanged(self, model: str, old: str, new: str) -> "sss":  # noqa: N802
        return [model, old, new]

    @signal()
    def JobNew(self, id_: int, job: str, model: str) -> "uos":  # noqa: N802
        return [id_, job, model]

    @signal()
    def JobRemoved(self, id_: int, job: str, model: str, result: str) -> "uoss":  # noqa: N802
        return [id_, job, model, result]

    @dbus_property(access=PropertyAccess.READ)
    def ActiveModel(self) -> "s":  # noqa: F821, N802
        return self.switcher.active or ""

    @dbus_property(access=PropertyAccess.READ)
    def Switching(self) -> "s":  # noqa: F821, N802
        return _switching(self.switcher.switching)

    @dbus_property(access=PropertyAccess.READ)
    def Models(self) -> "as":  # noqa: F821, N802
        return list(self.switcher.models)

    @dbus_property(access=PropertyAccess.READ)
    def QueueDepth(self) -> "u":  # noqa: F821, N802
        return self.switcher.queue_depth

    @dbus_property(access=PropertyAccess.READ)
    def Progress(self) -> "a(sssddsdd)":  # noqa: F821, N802
        return [[name, p.phase, p.kind, p.elapsed_secs, _secs(p.typical_secs), p.step or "",
                 _secs(p.step_elapsed_secs), _secs(p.step_typical_secs)]
                for name, p in self.switcher.progress.current().items()]

    # Introspection details busctl/gdbus show: out-argument names, property change semantics.
    for _fn, _names in ((Wake, ("state", "duration_secs")), (Sleep, ("state", "duration_secs")),
                        (StartWake, ("job",)), (StartSleep, ("job",)),
                        (Reload, ("added", "removed", "changed", "unchanged", "needs_restart")),
                        (Inspect, ("active_model", "models"))):
        for _arg, _name in zip(_fn.__dict__["__DBUS_METHOD"].introspection.out_args, _names):
            _arg.name = _name
    for _fn, _names in ((ModelStateChanged, ("model", "old_state", "new_state")),
                        (JobNew, ("id", "job", "model")), (JobRemoved, ("id", "job", "model", "result"))):
        for _arg, _name in zip(_fn.__dict__["__DBUS_SIGNAL"].introspection.args, _names):
            _arg.name = _name
    Models.introspection.annotations["org.freedesktop.DBus.Property.EmitsChangedSignal"] = "true"  # (a reload)
    QueueDepth.introspection.annotations["org.freedesktop.DBus.Property.EmitsChangedSignal"] = "false"
    Progress.introspection.annotations["org.freedesktop.DBus.Property.EmitsChangedSignal"] = "false"
    del _fn, _names, _arg, _name


class _Events(Listener):
    """Controller events -> signals.  Runs on the event loop inside state transitions, so it
    must never raise into them."""

    def __init__(self, iface: Llmuxd1):
        self.iface = iface
        self.enabled = False
        self._last = self._props()

    def _props(self) -> dict[str, Any]:
        sw = self.iface.switcher
        return {"ActiveModel": sw.active or "", "Switching": _switching(sw.switching)}

    def state_changed(self, model: str, old: State, new: State) -> None:
        if not self.enabled:
            return
        try:
            self.iface.ModelStateChanged(model, old.value, new.value)
        except Exception:  # noqa: BLE001 - a lost signal must not break a transition
            log.exception("D-Bus: could not emit ModelStateChanged")

    def model_added(self, model: str, state: State) -> None:
        self._models_changed()

    def model_removed(self, model: str) -> None:
        self._models_changed()

    def _models_changed(self) -> None:
        if not self.enabled:
            return
        try:
            self.iface.emit_properties_changed({"Models": list(self.iface.switcher.models)})
        except Exception:  # noqa: BLE001
            log.exception("D-Bus: could not emit PropertiesChanged")

    def active_changed(self, active: str | None, switching: tuple[str | None, str] | None) -> None:
        now = self._props()
        changed = {k: v for k, v in now.items() if self._last.get(k) != v}
        self._last = now
        if not self.enabled or not changed:
            return
        try:
            self.iface.emit_properties_changed(changed)
        except Exception:  # noqa: BLE001
            log.exception("D-Bus: could not emit PropertiesChanged")

