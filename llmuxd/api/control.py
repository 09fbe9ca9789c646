"""Control API: /control/sleep, /control/wake, /control/reload, /control/status,
/control/events (the transitions' progress, live: ``stream.py``), and what the status page reads
(/control/gpu, /control/models/{name}/log) — thin over the core.  Who may call it is decided
where the routes are mounted (``http.py``, ``auth.py``)."""

from __future__ import annotations

from aiohttp import web

from ..errors import BadRequest
from ..gpumem import GpuMonitor
from ..logtail import ModelLogs
from ..switcher import Switcher
from .requests import BodyLimits, read_model_request
from .stream import EventStream

MAX_CONTROL_BODY = 64 * 1024
DEFAULT_LOG_LINES = 100


class Control:
    def __init__(self, switcher: Switcher):
        self.switcher = switcher
        cfg = switcher.config
        self.limits = BodyLimits(MAX_CONTROL_BODY, cfg.max_json_depth, cfg.client_timeout_secs)
        self.events = EventStream(switcher.progress, cfg.client_timeout_secs)
        self.logs = ModelLogs(switcher)
        self.gpu = GpuMonitor(switcher)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/control/sleep", self.sleep),
            web.post("/control/wake", self.wake),
            web.post("/control/reload", self.reload),
            web.get("/control/status", self.status),
            web.get("/control/events", self.events.handle),
            web.get("/control/gpu", self.gpu_memory),
            web.get("/control/models/{name}/log", self.log),
        ]

    async def sleep(self, request: web.Request) -> web.Response:
        _, _, model = await read_model_request(request, self.limits)
        return web.json_response((await self.switcher.sleep(model)).json_dict())

    async def wake(self, request: web.Request) -> web.Response:
        _, _, model = await read_model_request(request, self.limits)
        return web.json_response((await self.switcher.wake(model)).json_dict())

    async def reload(self, request: web.Request) -> web.Response:
        return web.json_response((await self.switcher.reload()).json_dict())

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(self.switcher.status().json_dict())

    async def gpu_memory(self, request: web.Request) -> web.Response:
        return web.json_response((await self.gpu.memory()).json_dict())

    async def log(self, request: web.Request) -> web.Response:
        lines = request.query.get("lines", str(DEFAULT_LOG_LINES))
        if not lines.isascii() or not lines.isdigit() or len(lines) > 6:
            raise BadRequest("lines must be a whole number", param="lines")
        tail = await self.logs.tail(request.match_info["name"], int(lines))
        return web.json_response(tail.json_dict(), headers={"X-Content-Type-Options": "nosniff"})
