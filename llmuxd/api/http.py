"""The HTTP applications: the main port (proxy, and the control API with its status page
``/ui`` unless ``admin_port`` is set), the admin port (control API and ``/ui``, metrics,
health) and ``metrics_port`` (/metrics alone).

Every request's raw target is checked first (``paths.py``); who may call a route is decided
here, per route (``auth.py``), so no path spelling can reach a handler around its check.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Awaitable, Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from ..switcher import Switcher
from .auth import Access
from .control import Control
from .errors import error_middleware
from .paths import canonical
from .proxy import Proxy
from .ui import access_routes, page_routes

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ServerLog(logging.LoggerAdapter):
    """aiohttp's server logger.  A request aiohttp cannot parse (aiohttp answers it with a 400
    itself) is the client's fault: one debug line, not an error with a traceback — any client
    could otherwise fill the journal.  Everything else is logged as aiohttp logs it."""

    def __init__(self) -> None:
        super().__init__(logging.getLogger("aiohttp.server"), {})

    def exception(self, msg, *args, exc_info=True, **kwargs) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        if isinstance(exc, RequestPayloadError):  # a body aiohttp could not decode, read after us
            exc = exc.__cause__ or exc
        if isinstance(exc, (HttpProcessingError, RequestPayloadError)):
            detail = " ".join(str(getattr(exc, "message", exc)).split())[:200]
            self.debug("refused a malformed request: %s", detail)
            return
        super().exception(msg, *args, exc_info=exc_info, **kwargs)


@web.middleware
async def canonical_target(request: web.Request, handler: Handler) -> web.StreamResponse:
    canonical(request.raw_path)
    return await handler(request)


def _guarded(routes: list[web.RouteDef], check: Callable[[web.Request], None]) -> list[web.RouteDef]:
    def guard(handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            check(request)
            return await handler(request)

        return guarded

    return [web.route(r.method, r.path, guard(r.handler), **r.kwargs) for r in routes]


def _new_app(switcher: Switcher) -> web.Application:
    return web.Application(middlewares=[error_middleware, canonical_target],
                           client_max_size=switcher.config.max_request_bytes + 1)


def _common_routes(switcher: Switcher) -> list[web.RouteDef]:
    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "active_model": switcher.active})

    return [_metrics_route(switcher), web.get("/health", health)]


def build_app(switcher: Switcher, access: Access, *, with_control: bool = True) -> web.Application:
    """The main port: /v1 (API keys when configured), /health, /metrics, and /control unless it
    has a port of its own."""
    app = _new_app(switcher)
    proxy = Proxy(switcher)
    app.router.add_routes(_guarded(proxy.routes(), access.check_api))
    if with_control:
        _add_control(app, switcher, access)
    app.router.add_routes(_common_routes(switcher))
    if os.environ.get("LLMUXD_TEST_HOOKS") == "1":
        app.router.add_routes(_guarded([web.post("/debug/block-loop", _block_loop)], access.check_control))

    async def close_proxy(app: web.Application) -> None:
        await proxy.close()

    app.on_cleanup.append(close_proxy)
    return app


def build_admin_app(switcher: Switcher, access: Access) -> web.Application:
    """``admin_port``: the control API, /metrics and /health."""
    app = _new_app(switcher)
    _add_control(app, switcher, access)
    app.router.add_routes(_common_routes(switcher))
    return app


def _add_control(app: web.Application, switcher: Switcher, access: Access) -> None:
    """The control API and the status page (``/ui``) that reads it."""
    control = Control(switcher)
    app.router.add_routes(_guarded(control.routes() + access_routes(access), access.check_control))
    app.router.add_routes(page_routes())
    app.on_shutdown.append(control.events.close)  # open event streams end when llmuxd stops


async def _block_loop(request: web.Request) -> web.Response:
    """Test hook (LLMUXD_TEST_HOOKS=1 only): block the event loop, as a hung loop would, so the
    tests can see systemd's watchdog restart the service."""
    seconds = float((await request.json()).get("seconds", 60))
    logging.getLogger(__name__).warning("test hook: blocking the event loop for %.0f s", seconds)
    time.sleep(seconds)
    return web.json_response({"blocked_secs": seconds})


def build_metrics_app(switcher: Switcher) -> web.Application:
    """For ``metrics_port``: /metrics alone, as llmux serves it."""
    app = web.Application(middlewares=[error_middleware, canonical_target])
    app.router.add_routes([_metrics_route(switcher)])
    return app


def _metrics_route(switcher: Switcher) -> web.RouteDef:
    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=switcher.metrics.render(), headers={"Content-Type": switcher.metrics.content_type})

    return web.get("/metrics", metrics)
