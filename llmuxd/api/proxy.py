"""OpenAI-compatible proxy: route POST /v1/* by ``model``, relay the backend's answer unchanged."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import aiohttp
from aiohttp import web

from ..errors import BackendDied
from ..switcher import Switcher
from .errors import envelope
from .requests import read_model_request

log = logging.getLogger(__name__)

# Hop-by-hop headers (RFC 9110 7.6.1) and those aiohttp sets itself.
_DROP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
         "transfer-encoding", "upgrade", "host", "content-length"}


def _forward_headers(headers) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in _DROP}


class Proxy:
    def __init__(self, switcher: Switcher, max_request_bytes: int):
        self.switcher = switcher
        self.limit = max_request_bytes
        self.started = int(time.time())
        # No keep-alive into backends: a connection left open into a model's tree would be
        # dumped with it and be dead after a restore.
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True, limit=0),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
                auto_decompress=False,
            )
        return self._session

    async def close(self) -> None:
        if self._session:
            await self._session.close()

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/v1/models", self.list_models), web.get("/v1/models/{model}", self.get_model),
                web.post("/v1/{tail:.+}", self.forward)]

    def _model_card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.started, "owned_by": "llmuxd"}

    async def list_models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_card(n) for n in self.switcher.models]})

    async def get_model(self, request: web.Request) -> web.Response:
        return web.json_response(self._model_card(self.switcher.model(request.match_info["model"]).name))

    async def forward(self, request: web.Request) -> web.StreamResponse:
        body, data, name = await read_model_request(request, self.limit)
        model = self.switcher.model(name)
        if model.backend.served_name != name:  # the backend was started under another name
            data["model"] = model.backend.served_name
            body = json.dumps(data).encode()
        status = "error"
        try:
            async with self.switcher.serving(name):
                response, broken = await self._relay(request, model.backend.url + request.rel_url.raw_path_qs, body, name)
                status = "502" if broken else str(response.status)
                return response
        finally:
            self.switcher.metrics.requests.labels(name, status).inc()

    async def _relay(self, request: web.Request, url: str, body: bytes, name: str) -> tuple[web.StreamResponse, bool]:
        """Forward one request; returns the response and whether the backend broke mid-stream."""
        headers = _forward_headers(request.headers)
        try:
            upstream = await self.session().post(url, data=body, headers=headers)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise BackendDied(f"model '{name}' backend is unreachable: {e}", model=name) from None
        async with upstream:
            out_headers = _forward_headers(upstream.headers)
            streaming = upstream.headers.get("Content-Type", "").startswith("text/event-stream")
            if not streaming:
                try:
                    payload = await upstream.read()
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                    raise BackendDied(f"model '{name}' backend failed mid-response: {e}", model=name) from None
                return web.Response(status=upstream.status, body=payload, headers=out_headers), False
            response = web.StreamResponse(status=upstream.status, headers=out_headers)
            await response.prepare(request)
            broken = False
            try:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                # Headers are gone already: tell the client in the stream, as OpenAI does.
                msg = f"model '{name}' backend failed mid-stream: {e}"
                log.error("%s", msg, extra={"MODEL": name, "EVENT": "backend_died"})
                frame = json.dumps(envelope(msg, "server_error", BackendDied.code))
                await response.write(f"data: {frame}\n\n".encode())
                response.force_close()
                broken = True
            await response.write_eof()
            return response, broken
