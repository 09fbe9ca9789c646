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
  ``Reload() -> (as added, as removed, as changed, as unchanged, as needs_restart)``
      Re-read the config file and apply it, like ``POST /control/reload`` (which answers with
      the whole result): the models added, removed, changed (restarted with their new settings
      when next needed), unchanged, and the global settings whose new value needs a restart.
      An invalid file is refused with ``ConfigRefused``, every reason in the message.
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
  ``org.freedesktop.DBus.Properties.PropertiesChanged`` for ``ActiveModel``, ``Switching`` and
  ``Models`` (a reload).

Properties (read-only)
  ``ActiveModel`` s  the awake model serving requests, "" when none.
  ``Switching``   s  the switch in progress as ``"FROM->TO"`` (``"->TO"`` from no model), "".
  ``Models``      as the configured model names (changed by a reload).
  ``QueueDepth``  u  requests waiting for their model.  Not signalled (annotated
                     ``EmitsChangedSignal=false``): read it when you need it.

Errors (``io.llmux.Llmuxd1.Error.*``)
  ``UnknownModel``, ``SwitchFailed``, ``QueueTimeout``, ``ShuttingDown``, ``NotSupported``,
  ``TransitionFailed``, ``BadRequest``, ``ModelRemoved``, ``ConfigRefused`` for the domain errors of the same names, ``Failed`` for
  anything else.  The message is the one the HTTP API puts in ``error.message``.

Who may call what
  Everyone may introspect, call ``Inspect`` and read the properties.  The methods that change
  state (``Wake``, ``Sleep``, ``Reload``) are checked twice.  The bus refuses them first: the system bus's
  policy ``dbus/io.llmux.Llmuxd1.conf`` lets only root own the name and call them.  Then llmuxd
  checks again, in code, because a session bus or a bus at a custom address may have no such
  policy: it asks the bus daemon who sent the call (``GetConnectionUnixUser`` of the message's
  sender) and serves it only for uid 0 and llmuxd's own effective uid.  Everyone else gets
  ``org.freedesktop.DBus.Error.AccessDenied`` (the same error whether the bus or llmuxd
  refused), and the refusal is logged.  A caller whose uid the bus cannot tell is refused too.
"""

from .interface import BUS_NAME, ERROR_PREFIX, INSPECT_SIGNATURE, INTERFACE, OBJECT_PATH, Llmuxd1, to_dbus_error
from .transport import DbusStartError, DbusTransport, bus_socket_paths, system_bus_address, system_bus_available

__all__ = ["BUS_NAME", "ERROR_PREFIX", "INSPECT_SIGNATURE", "INTERFACE", "OBJECT_PATH", "DbusStartError",
           "DbusTransport", "Llmuxd1", "bus_socket_paths", "system_bus_address", "system_bus_available",
           "to_dbus_error"]
