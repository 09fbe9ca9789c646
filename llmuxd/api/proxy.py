"""OpenAI-compatible proxy: route POST /v1/* by ``model``, relay the backend's answer unchanged.

Every wait is bounded and every party may misbehave:

* upstream silence longer than ``upstream_read_timeout_secs`` (before the answer starts or
  between two chunks) ends the request: 502, or an SSE error frame once a stream has started;
* a client that goes away aborts its upstream request (counted as ``client_closed``); one that
  stops reading for ``client_timeout_secs`` is disconnected (``client_timeout``);
* the switcher's lease: when it is revoked (the drain deadline of an eviction, shutdown), the
  relay stops, a stream ends with an SSE error frame, an unanswered request gets a 503.

A stream is relayed byte for byte, written out at SSE frame boundaries, so a final error frame
never lands inside a half-relayed one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import aiohttp
import yarl
from aiohttp import web

from ..errors import BackendDied, Evicted, LlmuxdError
from ..lease import Lease
from ..switcher import Switcher
from .errors import envelope
from .headers import to_backend, to_client
from .paths import forward_target
from .requests import BodyLimits, read_model_request

log = logging.getLogger(__name__)

_FLUSH_BYTES = 64 * 1024  # relay a frame-less stream anyway once this much is pending
_FINAL_WRITE_SECS = 2.0  # for the error frame that ends a stream


class _ClientGone(Exception):
    def __init__(self, label: str):
        super().__init__(label)
        self.label = label


def _frame_end(buf: bytes) -> int:
    """Length of the prefix of ``buf`` that ends at an SSE frame boundary (0: none)."""
    lf, crlf = buf.rfind(b"\n\n"), buf.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


class _Exchange:
    """One proxied request: the client's stream once started, and how the request ended."""

    def __init__(self, request: web.Request, name: str):
        self.request = request
        self.name = name
        self.response: web.StreamResponse | None = None
        self.at_boundary = True  # all that was written ends at an SSE frame boundary
        self.status = "error"  # the llmuxd_requests_total label


class Proxy:
    def __init__(self, switcher: Switcher):
        cfg = switcher.config
        self.switcher = switcher
        self.limits = BodyLimits(cfg.max_request_bytes, cfg.max_json_depth, cfg.client_timeout_secs)
        self.client_timeout = cfg.client_timeout_secs
        self.read_timeout = cfg.policy.upstream_read_timeout_secs
        self.strip_authorization = bool(cfg.api_keys)  # the key is llmuxd's, not the backend's
        self.started = int(time.time())
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        # No keep-alive into backends: a connection left open into a model's tree would be
        # dumped with it and be dead after a restore.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True, limit=0),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self.read_timeout),
                auto_decompress=False, skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
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
        started = time.monotonic()
        target = forward_target(request.raw_path)
        body, data, name = await read_model_request(request, self.limits)
        self.switcher.model(name)  # an unknown model is refused here, not counted: its name is the client's
        headers = to_backend(request.headers, strip_authorization=self.strip_authorization)
        ex = _Exchange(request, name)
        try:
            async with self.switcher.serving(name) as lease:
                route = lease.route
                if route.served_name != name:  # the backend was started under another name
                    data["model"] = route.served_name
                    body = json.dumps(data).encode()
                url = yarl.URL(route.url + target, encoded=True)
                return await self._watched(ex, lease, url, body, headers)
        except asyncio.CancelledError:  # the client went away (aiohttp cancels its handler)
            if not ex.status.startswith("client_"):  # (or was dropped for not reading: kept)
                ex.status = "client_closed"
            raise
        except LlmuxdError as e:
            ex.status = "evicted" if isinstance(e, Evicted) else str(e.http_status)
            raise
        finally:
            self.switcher.request_done(name, ex.status, time.monotonic() - started)

    async def _watched(self, ex: _Exchange, lease: Lease, url, body: bytes, headers) -> web.StreamResponse:
        """Relay while watching the lease: a revoked lease stops the relay."""
        relay = asyncio.ensure_future(self._relay(ex, url, body, headers))
        revoked = asyncio.ensure_future(lease.revoked.wait())
        try:
            await asyncio.wait((relay, revoked), return_when=asyncio.FIRST_COMPLETED)
        finally:
            revoked.cancel()
            if not relay.done():
                relay.cancel()
                await asyncio.wait((relay,))  # it closes the upstream request
            if relay.done() and not relay.cancelled():
                relay.exception()  # retrieved here, raised below (or dropped if we are cancelled)
        if not relay.cancelled():
            return relay.result()
        reason = Evicted(lease.reason.message if lease.reason else "model evicted", model=ex.name)
        if ex.response is None:
            raise reason
        ex.status = "evicted"
        await self._end_stream(ex, reason)
        return ex.response

    async def _relay(self, ex: _Exchange, url, body: bytes, headers) -> web.StreamResponse:
        try:
            upstream = await self.session().post(url, data=body, headers=headers)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise BackendDied(self._failed(ex, "did not answer", e), model=ex.name) from None
        try:
            out_headers = to_client(upstream.headers)
            if upstream.headers.get("Content-Type", "").startswith("text/event-stream"):
                return await self._stream(ex, upstream, out_headers)
            try:
                payload = await upstream.read()
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                raise BackendDied(self._failed(ex, "failed mid-response", e), model=ex.name) from None
            ex.status = str(upstream.status)
            return web.Response(status=upstream.status, body=payload, headers=out_headers)
        finally:
            upstream.close()  # however this ends (a client gone, a revoked lease): abort upstream

    def _failed(self, ex: _Exchange, what: str, e: BaseException) -> str:
        if isinstance(e, asyncio.TimeoutError):
            return f"model '{ex.name}' backend stopped answering: nothing for {self.read_timeout:g} s"
        return f"model '{ex.name}' backend {what}: {e}"

    async def _stream(self, ex: _Exchange, upstream: aiohttp.ClientResponse, out_headers) -> web.StreamResponse:
        ex.response = web.StreamResponse(status=upstream.status, headers=out_headers)
        ex.status = str(upstream.status)
        pending = b""
        try:
            await self._write(ex, None)
            try:
                async for chunk in upstream.content.iter_any():
                    pending += chunk
                    cut = len(pending) if len(pending) >= _FLUSH_BYTES else _frame_end(pending)
                    if cut:
                        out, pending = pending[:cut], pending[cut:]
                        ex.at_boundary = _frame_end(out) == len(out)
                        await self._write(ex, out)
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                # Headers are gone already: tell the client in the stream, as OpenAI does.
                err = BackendDied(self._failed(ex, "failed mid-stream", e), model=ex.name)
                log.error("%s", err.message, extra={"MODEL": ex.name, "EVENT": "backend_died"})
                ex.status = "502"
                await self._end_stream(ex, err)
                return ex.response
            if pending:
                await self._write(ex, pending)
            await self._write(ex, b"", eof=True)
        except _ClientGone as gone:
            ex.status = gone.label
            log.info("model '%s': client %s mid-stream; upstream request aborted", ex.name,
                     "went away" if gone.label == "client_closed" else "stopped reading",
                     extra={"MODEL": ex.name, "EVENT": gone.label})
            if ex.request.transport is not None:
                ex.request.transport.abort()
        return ex.response

    async def _write(self, ex: _Exchange, data: bytes | None, eof: bool = False, timeout: float | None = None) -> None:
        """Prepare (``data`` None), write or finish the client's stream, within the client timeout."""
        assert ex.response is not None
        try:
            async with asyncio.timeout(timeout or self.client_timeout):
                if data is None:
                    await ex.response.prepare(ex.request)
                elif eof:
                    await ex.response.write_eof(data)
                else:
                    await ex.response.write(data)
        except TimeoutError:
            raise _ClientGone("client_timeout") from None
        except ConnectionError:
            raise _ClientGone("client_closed") from None

    async def _end_stream(self, ex: _Exchange, err: LlmuxdError) -> None:
        """End a started stream with an error frame (OpenAI's envelope) and close the connection."""
        assert ex.response is not None
        frame = json.dumps(envelope(err.message, err.openai_type, err.code))
        data = (b"" if ex.at_boundary else b"\n\n") + f"data: {frame}\n\n".encode()
        ex.response.force_close()
        try:
            if not ex.response.prepared:
                await self._write(ex, None, timeout=_FINAL_WRITE_SECS)
            await self._write(ex, data, timeout=_FINAL_WRITE_SECS)
            await self._write(ex, b"", eof=True, timeout=_FINAL_WRITE_SECS)
        except _ClientGone:
            if ex.request.transport is not None:
                ex.request.transport.abort()
