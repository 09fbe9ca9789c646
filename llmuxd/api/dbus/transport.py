"""Putting the object on a bus: which bus, owning the name, following the connection."""

import asyncio
import logging
import os

from dbus_fast import BusType, Message, MessageType, NameFlag, RequestNameReply
from dbus_fast.aio import MessageBus
from dbus_fast.errors import DBusError

from ...switcher import Switcher
from .interface import BUS_NAME, OBJECT_PATH, Llmuxd1, _Events, _note_call

log = logging.getLogger(__name__)

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
            self.interface.jobs.attach(bus)
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
        self.interface.jobs.detach()
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
