"""The HTTP application: proxy, control API, metrics and llmuxd's own health, on one port."""

from __future__ import annotations

import logging
import os
import time

from aiohttp import web

from ..switcher import Switcher
from .control import Control
from .errors import error_middleware
from .proxy import Proxy


def build_app(switcher: Switcher) -> web.Application:
    limit = switcher.config.max_request_bytes
    app = web.Application(middlewares=[error_middleware], client_max_size=limit + 1)
    proxy = Proxy(switcher, limit)
    app.router.add_routes(proxy.routes())
    app.router.add_routes(Control(switcher).routes())

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "active_model": switcher.active})

    app.router.add_routes([_metrics_route(switcher), web.get("/health", health)])
    if os.environ.get("LLMUXD_TEST_HOOKS") == "1":
        app.router.add_post("/debug/block-loop", _block_loop)

    async def close_proxy(app: web.Application) -> None:
        await proxy.close()

    app.on_cleanup.append(close_proxy)
    return app


async def _block_loop(request: web.Request) -> web.Response:
    """Test hook (LLMUXD_TEST_HOOKS=1 only): block the event loop, as a hung loop would, so the
    tests can see systemd's watchdog restart the service."""
    seconds = float((await request.json()).get("seconds", 60))
    logging.getLogger(__name__).warning("test hook: blocking the event loop for %.0f s", seconds)
    time.sleep(seconds)
    return web.json_response({"blocked_secs": seconds})


def build_metrics_app(switcher: Switcher) -> web.Application:
    """For ``metrics_port``: /metrics alone, as llmux serves it."""
    app = web.Application()
    app.router.add_routes([_metrics_route(switcher)])
    return app


def _metrics_route(switcher: Switcher) -> web.RouteDef:
    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=switcher.metrics.render(), headers={"Content-Type": switcher.metrics.content_type})

    return web.get("/metrics", metrics)
