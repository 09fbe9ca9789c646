"""Control API: /control/sleep, /control/wake, /control/status — thin over the Switcher."""

from __future__ import annotations

from aiohttp import web

from ..switcher import Switcher
from .requests import read_model_request


class Control:
    def __init__(self, switcher: Switcher):
        self.switcher = switcher

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/control/sleep", self.sleep),
            web.post("/control/wake", self.wake),
            web.get("/control/status", self.status),
        ]

    async def sleep(self, request: web.Request) -> web.Response:
        _, _, model = await read_model_request(request, 64 * 1024)
        return web.json_response(await self.switcher.sleep(model))

    async def wake(self, request: web.Request) -> web.Response:
        _, _, model = await read_model_request(request, 64 * 1024)
        return web.json_response(await self.switcher.wake(model))

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(self.switcher.status())
