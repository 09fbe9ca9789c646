"""The D-Bus transport: the controller's verbs on the system bus (or the session bus, or any
address, for development).  Translation only: every call goes to the same ``Switcher`` method
the HTTP control API calls; domain errors become named D-Bus errors in ONE place
(:func:`dbus_errors`).

Bus name ``io.llmux.Llmuxd1``, object ``/io/llmux/Llmuxd1``, interface ``io.llmux.Llmuxd1``;
the reference of its methods, signals and properties is ``dbus/io.llmux.Llmuxd1.xml`` (the tests
compare it with what this package exports).  In short:

* ``Wake(s) -> (s state, d duration_secs)`` and ``Sleep(s)`` reply when the transition is
  complete (queued behind other switches, like ``POST /control/{wake,sleep}``);
  ``StartWake(s) -> (o job)`` and ``StartSleep(s)`` queue the same transition and return at
  once with a job object (:mod:`.jobs`), whose end is the signal ``JobRemoved(u id, o job,
  s model, s result)``;
* ``Reload() -> (as added, as removed, as changed, as unchanged, as needs_restart)`` re-reads
  the config file and applies it, like ``POST /control/reload``; an invalid file is refused
  with ``ConfigRefused``, every reason in the message;
* ``Inspect() -> (s active_model, a(ssaussddss) models)``: what ``/control/status`` says, in
  D-Bus types;
* ``ModelStateChanged(s model, s old_state, s new_state)``, ``JobNew``, ``JobRemoved``;
  ``PropertiesChanged`` for ``ActiveModel``, ``Switching`` and ``Models`` (changed by a
  reload); ``QueueDepth`` and ``Progress`` (the transitions in progress, as
  ``/control/status``'s ``progress``) are read when needed;
* errors ``io.llmux.Llmuxd1.Error.<Name>`` for the domain errors (:func:`to_dbus_error`).

Who may call what
  Everyone may introspect, call ``Inspect`` and read the properties (of the jobs too).  The
  methods that change state (``Wake``, ``Sleep``, ``StartWake``, ``StartSleep``, ``Reload``) are
  checked twice.  The bus refuses them first: the system bus's policy
  ``dbus/io.llmux.Llmuxd1.conf`` lets only root own the name and call them.  Then llmuxd checks
  again, in code, because a session bus or a bus at a custom address may have no such policy:
  it asks the bus daemon who sent the call (``GetConnectionUnixUser`` of the message's sender)
  and serves it only for uid 0 and llmuxd's own effective uid.  Everyone else gets
  ``org.freedesktop.DBus.Error.AccessDenied`` (the same error whether the bus or llmuxd
  refused), and the refusal is logged.  A caller whose uid the bus cannot tell is refused too.
"""

from .interface import BUS_NAME, ERROR_PREFIX, INSPECT_SIGNATURE, INTERFACE, OBJECT_PATH, Llmuxd1, to_dbus_error
from .jobs import CANCELED, DONE, FAILED, JOB_INTERFACE, JOB_PATH
from .transport import DbusStartError, DbusTransport, bus_socket_paths, system_bus_address, system_bus_available

__all__ = ["BUS_NAME", "CANCELED", "DONE", "ERROR_PREFIX", "FAILED", "INSPECT_SIGNATURE", "INTERFACE", "JOB_INTERFACE",
           "JOB_PATH", "OBJECT_PATH", "DbusStartError", "DbusTransport", "Llmuxd1", "bus_socket_paths",
           "system_bus_address", "system_bus_available", "to_dbus_error"]
