"""An admitted request's hold on its model (:class:`Lease`) and where it goes (:class:`Route`).
Handed out by the switcher, held by the proxy for the duration of one request."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .errors import Evicted
from .upstream import Upstream


@dataclass(frozen=True, eq=False)
class Route:
    """Where an admitted request goes: the model's server, the name it serves under, and the
    connections to it (kept alive during this awake period of the model only: the switcher
    closes them before the model is evicted, and the next admission gets a new pool)."""

    url: str
    served_name: str
    upstream: Upstream


class Lease:
    """One admitted request's hold on its model, and its route.  The controller revokes it when
    it takes the model away before the request ended (:meth:`revoke`); the holder, told through
    :meth:`on_revoke`, must then stop and release it."""

    __slots__ = ("model", "route", "reason", "_on_revoke")

    def __init__(self, model: str, route: Route):
        self.model = model
        self.route = route
        self.reason: Evicted | None = None
        self._on_revoke: Callable[[Evicted], None] | None = None

    @property
    def revoked(self) -> bool:
        return self.reason is not None

    def on_revoke(self, callback: Callable[[Evicted], None] | None) -> None:
        """``callback(reason)`` is called (on the event loop, once) when the lease is revoked;
        at once if it already is.  None: no longer."""
        self._on_revoke = callback
        if callback is not None and self.reason is not None:
            callback(self.reason)

    def revoke(self, reason: Evicted) -> None:
        if self.reason is None:
            self.reason = reason
            if self._on_revoke is not None:
                self._on_revoke(reason)
