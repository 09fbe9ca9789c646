"""Control API: /control/sleep, /control/wake, /control/reload, /control/status — thin over the Switcher.
Who may call it is decided where the routes are mounted (``http.py``, ``auth.py``)."""

from __future__ import annotations

from aiohttp import web

from ..switcher import Switcher
from .requests import BodyLimits, read_model_request

MAX_CONTROL_BODY = 64 * 1024


class Control:
    def __init__(self, switcher: Switcher):
        self.switcher = switcher
        cfg = switcher.config
        self.limits = BodyLimits(MAX_CONTROL_BODY, cfg.max_json_depth, cfg.client_timeout_secs)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/control/sleep", self.sleep),
            web.post("/control/wake", self.wake),
            web.post("/control/reload", self.reload),
            web.get("/control/status", self.status),
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
