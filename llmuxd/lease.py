"""An admitted request's hold on its model (:class:`Lease`) and where it goes (:class:`Route`).
Handed out by the switcher, held by the proxy for the duration of one request."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

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
    """One admitted request's hold on its model, and its route.  ``revoked`` is set when the
    controller takes the model away before the request ended; the holder must then stop and
    release it."""

    def __init__(self, model: str, route: Route):
        self.model = model
        self.route = route
        self.revoked = asyncio.Event()
        self.reason: Evicted | None = None

    def revoke(self, reason: Evicted) -> None:
        if not self.revoked.is_set():
            self.reason = reason
            self.revoked.set()
