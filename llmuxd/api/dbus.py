"""The D-Bus transport: the controller's verbs on the system bus (or the session bus, or any
address, for development).  Translation only: every call goes to the same ``Switcher`` method
the HTTP control API calls; domain errors become named D-Bus errors in ONE place
(:func:`dbus_errors`).

Bus name ``io.llmux.Llmuxd1``, object ``/io/llmux/Llmuxd1``, interface ``io.llmux.Llmuxd1``:

Methods
  ``Wake(s model) -> (s state, d duration_secs)``
  ``Sleep(s model) -> (s state, d duration_secs)``
      Reply when the transition is complete (queued behind other switches, like
      ``POST /control/{wake,sleep}``).  ``state`` is the model's state afterwards (``awake``;
      ``asleep`` or ``stopped`` per its eviction policy, ``stopped`` also when an eviction
      escalated); ``duration_secs`` 0 when there was nothing to do.
  ``Inspect() -> (s active_model, a(ssaussddss) models)``
      ``active_model`` is "" when none.  One struct per model, in config order::

          (s name, s state, au pids, s eviction_weights, s eviction_process,
           d last_wake_secs, d last_sleep_secs, s last_wake_kind, s last_error)

      timings are -1 when the transition never happened; ``last_wake_kind`` is
      ``cold_start``/``wake`` or ""; ``last_error`` "" when none.  ``busctl call ... Inspect``
      prints e.g.::

          sa(ssaussddss) "m1" 2 "m1" "awake" 2 4242 4243 "offload" "keep_running" 1.52 -1 "cold_start" "" "m2" "stopped" 0 "offload" "keep_running" -1 -1 "" ""

Signals
  ``ModelStateChanged(s model, s old_state, s new_state)`` on every model state change.
  ``org.freedesktop.DBus.Properties.PropertiesChanged`` for ``ActiveModel`` and ``Switching``.

Properties (read-only)
  ``ActiveModel`` s  the awake model serving requests, "" when none.
  ``Switching``   s  the switch in progress as ``"FROM->TO"`` (``"->TO"`` from no model), "".
  ``Models``      as the configured model names (constant).
  ``QueueDepth``  u  requests waiting for their model.  Not signalled (annotated
                     ``EmitsChangedSignal=false``): read it when you need it.

Errors (``io.llmux.Llmuxd1.Error.*``)
  ``UnknownModel``, ``SwitchFailed``, ``QueueTimeout``, ``ShuttingDown``, ``NotSupported``,
  ``TransitionFailed``, ``BadRequest`` for the domain errors of the same names, ``Failed`` for
  anything else.  The message is the one the HTTP API puts in ``error.message``.

Who may call what
  Everyone may introspect, call ``Inspect`` and read the properties.  The methods that change
  state (``Wake``, ``Sleep``) are checked twice.  The bus refuses them first: the system bus's
  policy ``dbus/io.llmux.Llmuxd1.conf`` lets only root own the name and call them.  Then llmuxd
  checks again, in code, because a session bus or a bus at a custom address may have no such
  policy: it asks the bus daemon who sent the call (``GetConnectionUnixUser`` of the message's
  sender) and serves it only for uid 0 and llmuxd's own effective uid.  Everyone else gets
  ``org.freedesktop.DBus.Error.AccessDenied`` (the same error whether the bus or llmuxd
  refused), and the refusal is logged.  A caller whose uid the bus cannot tell is refused too.
"""

import asyncio
import contextvars
import functools
import logging
import os
from typing import Any, Awaitable, Callable

from dbus_fast import BusType, Message, MessageType, NameFlag, RequestNameReply
from dbus_fast.aio import MessageBus
from dbus_fast.constants import ErrorType, PropertyAccess
from dbus_fast.errors import DBusError
from dbus_fast.service import ServiceInterface, dbus_property, method, signal

from ..errors import Forbidden, LlmuxdError
from ..orchestrator import Listener, State
from ..switcher import Switcher

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
        return [r["state"], float(r["duration_secs"])]

    @method()
    @dbus_errors
    async def Sleep(self, model: "s") -> "sd":  # noqa: F821, N802
        await self._check_caller("Sleep")
        r = await self.switcher.sleep(model)
        return [r["state"], float(r["duration_secs"])]

    @method()
    @dbus_errors
    async def Inspect(self) -> "sa(ssaussddss)":  # noqa: F821, N802
        st = self.switcher.status()
        models = [
            [
                name, m["state"], [int(p) for p in m["pids"]], m["eviction"]["weights"], m["eviction"]["process"],
                _secs(m["last_wake_secs"]), _secs(m["last_sleep_secs"]), m["last_wake_kind"] or "",
                m["last_error"] or "",
            ]
            for name, m in st["models"].items()
        ]
        return [st["active_model"] or "", models]

    @signal()
    def ModelStateChanged(self, model: str, old: str, new: str) -> "sss":  # noqa: N802
        return [model, old, new]

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
        return int(self.switcher.status()["queue_depth"])

    # Introspection details busctl/gdbus show: out-argument names, property change semantics.
    for _fn, _names in ((Wake, ("state", "duration_secs")), (Sleep, ("state", "duration_secs")),
                        (Inspect, ("active_model", "models"))):
        for _arg, _name in zip(_fn.__dict__["__DBUS_METHOD"].introspection.out_args, _names):
            _arg.name = _name
    for _arg, _name in zip(ModelStateChanged.__dict__["__DBUS_SIGNAL"].introspection.args,
                           ("model", "old_state", "new_state")):
        _arg.name = _name
    Models.introspection.annotations["org.freedesktop.DBus.Property.EmitsChangedSignal"] = "const"
    QueueDepth.introspection.annotations["org.freedesktop.DBus.Property.EmitsChangedSignal"] = "false"
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


# -- the transport -------------------------------------------------------------------------------
SYSTEM_BUS_DEFAULT = "unix:path=/run/dbus/system_bus_socket"


def system_bus_address() -> str:
    return os.environ.get("DBUS_SYSTEM_BUS_ADDRESS", SYSTEM_BUS_DEFAULT)


def bus_socket_paths(address: str) -> list[str]:
    """The unix socket paths in a D-Bus address (``unix:path=/x,guid=..;unix:abstract=...``)."""
    paths = []
    for part in address.split(";"):
        transport, _, params = part.partition(":")
        if transport != "unix":
            continue
        for kv in params.split(","):
            k, _, v = kv.partition("=")
            if k == "path" and v:
                paths.append(v)
    return paths


def system_bus_available() -> bool:
    return any(os.path.exists(p) for p in bus_socket_paths(system_bus_address()))


class DbusStartError(Exception):
    """The transport could not start: the bus is unreachable or the name cannot be owned."""


class DbusTransport:
    """Export the controller on a bus.

    ``bus`` is ``"system"`` (the default; ``$DBUS_SYSTEM_BUS_ADDRESS`` or the standard socket),
    ``"session"`` (``$DBUS_SESSION_BUS_ADDRESS``), or a D-Bus address such as
    ``unix:path=/run/llmuxd-test/bus``.  ``await start()`` connects, exports the object, then
    requests the name (raising :class:`DbusStartError` with the reason when any of that fails);
    ``await stop()`` releases everything and is safe to call at any time.
    """

    def __init__(self, switcher: Switcher, bus: str = "system"):
        self.switcher = switcher
        self.bus_spec = bus
        self.interface = Llmuxd1(switcher, caller_uid=self._caller_uid)
        self._events = _Events(self.interface)
        self._listening = False
        self._bus: MessageBus | None = None
        self._watch: asyncio.Task | None = None
        self._stopping = False

    @property
    def where(self) -> str:
        if self.bus_spec == "system":
            return f"the system bus ({system_bus_address()})"
        if self.bus_spec == "session":
            return f"the session bus ({os.environ.get('DBUS_SESSION_BUS_ADDRESS', 'DBUS_SESSION_BUS_ADDRESS unset')})"
        return f"the bus at {self.bus_spec}"

    @property
    def unique_name(self) -> str | None:
        return self._bus.unique_name if self._bus else None

    async def _caller_uid(self, sender: str) -> int:
        """The uid the bus daemon knows the connection ``sender`` by (``GetConnectionUnixUser``)."""
        bus = self._bus
        if bus is None:
            raise RuntimeError("not connected")
        reply = await bus.call(Message(
            destination="org.freedesktop.DBus", path="/org/freedesktop/DBus", interface="org.freedesktop.DBus",
            member="GetConnectionUnixUser", signature="s", body=[sender]))
        if reply is None or reply.message_type is MessageType.ERROR:
            detail = reply.body[0] if reply is not None and reply.body else ""
            raise RuntimeError(f"{reply.error_name if reply is not None else 'no reply'}: {detail}")
        return int(reply.body[0])

    def _message_bus(self) -> MessageBus:
        if self.bus_spec == "system":
            return MessageBus(bus_type=BusType.SYSTEM)
        if self.bus_spec == "session":
            return MessageBus(bus_type=BusType.SESSION)
        if ":" not in self.bus_spec:
            raise DbusStartError(f"D-Bus bus {self.bus_spec!r}: expected 'system', 'session' or an address")
        return MessageBus(bus_address=self.bus_spec)

    async def start(self) -> None:
        self._stopping = False
        try:
            bus = await self._message_bus().connect()
        except DbusStartError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure to connect is reported the same way
            raise DbusStartError(f"cannot connect to {self.where}: {type(e).__name__}: {e}") from None
        self._bus = bus
        try:
            bus.add_message_handler(_note_call)  # before export: the uid check reads what it notes
            bus.export(OBJECT_PATH, self.interface)
            try:
                reply = await bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
            except DBusError as e:
                hint = ""
                if e.type == "org.freedesktop.DBus.Error.AccessDenied":
                    hint = (" (install dbus/io.llmux.Llmuxd1.conf in /usr/share/dbus-1/system.d/ and reload "
                            "dbus; only root may own the name)")
                raise DbusStartError(f"cannot own {BUS_NAME} on {self.where}: {e.text}{hint}") from None
            if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
                raise DbusStartError(
                    f"cannot own {BUS_NAME} on {self.where}: it is already owned by another connection "
                    "(is another llmuxd running?)"
                )
        except BaseException:
            await self._disconnect()
            raise
        if not self._listening:
            self.switcher.add_listener(self._events)
            self._listening = True
        self._events._last = self._events._props()
        self._events.enabled = True
        self._watch = asyncio.create_task(self._watch_disconnect(bus), name="dbus-watch")
        log.info("D-Bus: %s %s on %s", BUS_NAME, OBJECT_PATH, self.where)

    async def _watch_disconnect(self, bus: MessageBus) -> None:
        try:
            await bus.wait_for_disconnect()
        except Exception as e:  # noqa: BLE001
            reason = f": {e}"
        else:
            reason = ""
        if not self._stopping:
            self._events.enabled = False
            log.error("D-Bus: lost the connection to %s%s; the D-Bus API is unavailable", self.where, reason)

    async def _disconnect(self) -> None:
        bus, self._bus = self._bus, None
        if bus is None:
            return
        self._events.enabled = False
        try:
            bus.unexport(OBJECT_PATH, self.interface)
        except Exception:  # noqa: BLE001 - already gone
            pass
        bus.disconnect()
        try:
            await asyncio.wait_for(bus.wait_for_disconnect(), 5)
        except Exception:  # noqa: BLE001 - disconnect errors do not matter any more
            pass

    async def stop(self) -> None:
        self._stopping = True
        self._events.enabled = False
        await self._disconnect()
        if self._watch is not None:
            await asyncio.gather(self._watch, return_exceptions=True)
            self._watch = None
