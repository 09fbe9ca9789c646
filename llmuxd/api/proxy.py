"""OpenAI-compatible proxy: route POST /v1/* by ``model``, relay the backend's answer unchanged.

Every wait is bounded and every party may misbehave:

* upstream silence longer than ``upstream_read_timeout_secs`` (before the answer starts or
  between two chunks) ends the request: 502, or an SSE error frame once a stream has started;
* a client that goes away aborts its upstream request (counted as ``client_closed``); one that
  stops reading for ``client_timeout_secs`` is disconnected (``client_timeout``);
* the switcher's lease: when it is revoked (the drain deadline of an eviction, shutdown), the
  relay stops, a stream ends with an SSE error frame, an unanswered request gets a 503;
* a streaming request that waits for its model gets SSE comment lines meanwhile (``waiting.py``:
  a timer per request, and a task only once a request has waited that long).

A stream is relayed byte for byte, written out at SSE frame boundaries, so a final error frame
never lands inside a half-relayed one.

Upstream connections are kept alive, in the route's :class:`~llmuxd.upstream.Upstream` (one per
model and awake period, closed by the switcher before the model is evicted); a connection whose
request did not end cleanly is aborted, never reused.  The relay runs in the request's own task:
a revoked lease or a client that stopped reading cancels it (:class:`_Exchange`), with no task,
timeout object or wait set of its own per request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from aiohttp import web

from ..errors import BackendDied, Evicted, LlmuxdError
from ..lease import Lease
from ..switcher import Switcher
from ..upstream import Response as UpstreamResponse, UpstreamClosed, UpstreamError, UpstreamTimeout
from .errors import envelope
from .headers import to_backend, to_client
from .paths import forward_target
from .requests import BodyLimits, read_model_request
from .waiting import SSE_HEADERS, upstream_error, waiting_comment

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
    """One proxied request: the client's stream once started, how the request ended, and what
    may cancel its relay.  While ``armed``, the relay (running in the request's task) is
    cancelled when the lease is revoked (``evicted``) or when a write to the client has been
    waiting ``client_timeout`` (``client_timeout``: one timer per stream, moved on lazily);
    ``cancelled_for`` says which, so the relay can tell it from the client going away."""

    __slots__ = ("request", "name", "response", "at_boundary", "status", "task", "armed", "cancelled_for",
                 "finishing", "writing_since", "_timer", "_timeout", "keepalive", "admitted")

    def __init__(self, request: web.Request, name: str):
        self.request = request
        self.name = name
        self.response: web.StreamResponse | None = None
        self.at_boundary = True  # all that was written ends at an SSE frame boundary
        self.status = "error"  # the llmuxd_requests_total label
        self.task: asyncio.Task | None = None
        self.armed = False
        self.cancelled_for: str | None = None
        self.finishing = False  # the stream's end is being written
        self.writing_since: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timeout = 0.0
        # While the request waits for its model: the timer of its first keep-alive, then the task
        # that writes them until ``admitted`` is set.
        self.keepalive: asyncio.TimerHandle | asyncio.Task | None = None
        self.admitted: asyncio.Event | None = None

    @property
    def started(self) -> bool:
        """The response's status line and headers went out (its stream has begun)."""
        return self.response is not None and self.response.prepared

    def arm(self) -> None:
        self.task = asyncio.current_task()
        self.armed = True

    def disarm(self) -> None:
        self.armed = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def revoked(self, reason: Evicted) -> None:
        self._cancel("evicted")

    def _cancel(self, why: str) -> None:
        if self.armed and self.cancelled_for is None:
            self.cancelled_for = why
            self.task.cancel()

    def watch_writes(self, timeout: float) -> None:
        self._timeout = timeout
        self._timer = asyncio.get_running_loop().call_later(timeout, self._check_writes)

    def _check_writes(self) -> None:
        self._timer = None
        if not self.armed:
            return
        loop = asyncio.get_running_loop()
        since = self.writing_since
        if since is not None and loop.time() - since >= self._timeout:
            self._cancel("client_timeout")
            return
        self._timer = loop.call_at((since if since is not None else loop.time()) + self._timeout, self._check_writes)


class Proxy:
    def __init__(self, switcher: Switcher):
        cfg = switcher.config
        self.switcher = switcher
        self.limits = BodyLimits(cfg.max_request_bytes, cfg.max_json_depth, cfg.client_timeout_secs)
        self.client_timeout = cfg.client_timeout_secs
        self.read_timeout = cfg.policy.upstream_read_timeout_secs
        self.keepalive = cfg.policy.sse_keepalive_secs
        self.strip_authorization = bool(cfg.api_keys)  # the key is llmuxd's, not the backend's
        self.started = int(time.time())

    async def close(self) -> None:
        """Nothing to close: the upstream connections are the switcher's (see Route.upstream)."""

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
        fields = to_backend(request.raw_headers, strip_authorization=self.strip_authorization)
        ex = _Exchange(request, name)
        try:
            if self.keepalive and data.get("stream") is True:
                ex.keepalive = asyncio.get_running_loop().call_later(self.keepalive, self._keep_alive, ex, started)
            try:
                lease = await self.switcher.admit(name)
            finally:
                await self._admitted(ex)
            try:
                return await self._relay(ex, lease, target, body, data, fields)
            finally:
                self.switcher.release(lease)
        except asyncio.CancelledError:  # the client went away (aiohttp cancels its handler)
            if not ex.status.startswith("client_"):  # (or was dropped for not reading: kept)
                ex.status = "client_closed"
            raise
        except LlmuxdError as e:
            ex.status = "evicted" if isinstance(e, Evicted) else str(e.http_status)
            if not ex.started:
                raise
            await self._end_stream(ex, e)  # after keep-alives: the status line went out already
            return ex.response
        finally:
            self.switcher.request_done(name, ex.status, time.monotonic() - started)

    def _keep_alive(self, ex: _Exchange, since: float) -> None:
        """The request has waited ``keepalive`` seconds for its model: start its response and an
        SSE comment every ``keepalive`` seconds until it is admitted (see ``waiting.py``)."""
        ex.admitted = asyncio.Event()
        ex.keepalive = asyncio.ensure_future(self._keep_writing(ex, since))

    async def _keep_writing(self, ex: _Exchange, since: float) -> None:
        assert ex.admitted is not None
        try:
            ex.response = web.StreamResponse(headers=SSE_HEADERS)
            await self._final_write(ex, None, secs=self.client_timeout)
            while True:
                comment = waiting_comment(self.switcher.progress, ex.name, time.monotonic() - since)
                await self._final_write(ex, comment, secs=self.client_timeout)
                try:
                    await asyncio.wait_for(ex.admitted.wait(), self.keepalive)
                    return
                except TimeoutError:
                    pass
        except _ClientGone as gone:  # the request's handler is cancelled by the connection's end
            ex.status = gone.label
            self._abort_client(ex)

    @staticmethod
    async def _admitted(ex: _Exchange) -> None:
        """The wait for the model is over: no more keep-alives (never in the middle of a write)."""
        if isinstance(ex.keepalive, asyncio.TimerHandle):
            ex.keepalive.cancel()
        elif ex.keepalive is not None:
            ex.admitted.set()
            await asyncio.shield(ex.keepalive)
        ex.keepalive = None

    def _evicted(self, ex: _Exchange, lease: Lease) -> Evicted:
        return Evicted(lease.reason.message if lease.reason else f"model '{ex.name}' is being evicted", model=ex.name)

    async def _relay(self, ex: _Exchange, lease: Lease, target: str, body: bytes, data: dict,
                     fields: bytes) -> web.StreamResponse:
        """Relay while watching the lease: a revoked lease stops the relay."""
        route = lease.route
        if route.served_name != ex.name:  # the backend was started under another name
            data["model"] = route.served_name
            body = json.dumps(data).encode()
        if lease.revoked:
            raise self._evicted(ex, lease)
        head = b"POST %s HTTP/1.1\r\n%s" % (target.encode("ascii"), fields)
        upstream: UpstreamResponse | None = None
        ex.arm()
        lease.on_revoke(ex.revoked)
        try:
            try:
                upstream = await route.upstream.request(head, body)
            except UpstreamClosed:  # closed before this request got a connection: being evicted
                raise self._evicted(ex, lease) from None
            except UpstreamError as e:
                raise BackendDied(self._failed(ex, "did not answer", e), model=ex.name) from None
            out_headers = to_client(upstream.headers)
            if upstream.event_stream and (not ex.started or upstream.status == 200):
                return await self._stream(ex, upstream, out_headers)
            try:
                payload = await upstream.read()
            except UpstreamError as e:
                raise BackendDied(self._failed(ex, "failed mid-response", e), model=ex.name) from None
            ex.disarm()
            ex.status = str(upstream.status)
            if ex.started:  # after keep-alives: an answer that is not a stream ends it as an error
                content_type = next((v for k, v in upstream.headers if k.lower() == "content-type"), "")
                await self._end_stream(ex, upstream_error(ex.name, upstream.status, content_type, payload))
                return ex.response
            return web.Response(status=upstream.status, body=payload, headers=out_headers)
        except asyncio.CancelledError:
            why = ex.cancelled_for
            if why is None or ex.task.cancelling() != 1:  # the client went away (too)
                raise
            ex.task.uncancel()  # ours alone: the relay stops, the request is answered
            ex.disarm()
            if upstream is not None:
                upstream.release()  # aborted: the backend sees the request abandoned
            if why == "client_timeout":
                self._client_gone(ex, _ClientGone(why))
                return ex.response
            reason = self._evicted(ex, lease)
            if ex.response is None:
                raise reason from None
            ex.status = "evicted"
            if ex.finishing:  # all was relayed, the client is slow to take the end: dropped
                self._abort_client(ex)
            else:
                await self._end_stream(ex, reason)
            return ex.response
        finally:
            ex.disarm()
            lease.on_revoke(None)
            if upstream is not None:
                upstream.release()  # however this ends (a client gone, a revoked lease): abort upstream

    def _failed(self, ex: _Exchange, what: str, e: BaseException) -> str:
        if isinstance(e, UpstreamTimeout):
            return f"model '{ex.name}' backend stopped answering: nothing for {self.read_timeout:g} s"
        return f"model '{ex.name}' backend {what}: {e}"

    async def _stream(self, ex: _Exchange, upstream: UpstreamResponse, out_headers) -> web.StreamResponse:
        if ex.response is None:
            ex.response = web.StreamResponse(status=upstream.status, headers=out_headers)
        ex.status = str(upstream.status)
        ex.watch_writes(self.client_timeout)
        pending = b""
        try:
            if not ex.started:
                await self._write(ex, None)
            while True:
                try:
                    chunk = await upstream.read_some()
                except UpstreamError as e:
                    # Headers are gone already: tell the client in the stream, as OpenAI does.
                    ex.disarm()
                    upstream.release()
                    err = BackendDied(self._failed(ex, "failed mid-stream", e), model=ex.name)
                    log.error("%s", err.message, extra={"MODEL": ex.name, "EVENT": "backend_died"})
                    ex.status = "502"
                    await self._end_stream(ex, err)
                    return ex.response
                if not chunk:
                    break
                pending = pending + chunk if pending else chunk
                cut = _frame_end(pending)
                if len(pending) >= _FLUSH_BYTES:
                    ex.at_boundary = cut == len(pending)
                    cut = len(pending)
                elif cut:
                    ex.at_boundary = True
                else:
                    continue
                if cut == len(pending):
                    out, pending = pending, b""
                else:
                    out, pending = pending[:cut], pending[cut:]
                await self._write(ex, out)
            upstream.release()  # received whole: the connection goes back to the pool
            if pending:
                await self._write(ex, pending)
            ex.finishing = True
            await self._write(ex, b"", eof=True)
        except _ClientGone as gone:
            self._client_gone(ex, gone)
        return ex.response

    def _client_gone(self, ex: _Exchange, gone: _ClientGone) -> None:
        ex.status = gone.label
        log.info("model '%s': client %s mid-stream; upstream request aborted", ex.name,
                 "went away" if gone.label == "client_closed" else "stopped reading",
                 extra={"MODEL": ex.name, "EVENT": gone.label})
        self._abort_client(ex)

    @staticmethod
    def _abort_client(ex: _Exchange) -> None:
        if ex.request.transport is not None:
            ex.request.transport.abort()

    async def _write(self, ex: _Exchange, data: bytes | None, eof: bool = False) -> None:
        """Prepare (``data`` None), write or finish the client's stream; a write still waiting
        after the client timeout cancels the relay (``_Exchange.watch_writes``)."""
        ex.writing_since = asyncio.get_running_loop().time()
        try:
            if data is None:
                await ex.response.prepare(ex.request)
            elif eof:
                await ex.response.write_eof(data)
            else:
                await ex.response.write(data)
        except ConnectionError:
            raise _ClientGone("client_closed") from None
        finally:
            ex.writing_since = None

    async def _final_write(self, ex: _Exchange, data: bytes | None, eof: bool = False,
                           secs: float = _FINAL_WRITE_SECS) -> None:
        """As :meth:`_write`, within ``secs`` (no relay is running: nothing else watches)."""
        try:
            async with asyncio.timeout(secs):
                await self._write(ex, data, eof)
        except TimeoutError:
            raise _ClientGone("client_timeout") from None

    async def _end_stream(self, ex: _Exchange, err: LlmuxdError | dict) -> None:
        """End a started stream with an error frame (OpenAI's envelope, or the one given) and
        close the connection."""
        assert ex.response is not None
        frame = json.dumps(err if isinstance(err, dict) else envelope(err.message, err.openai_type, err.code))
        data = (b"" if ex.at_boundary else b"\n\n") + f"data: {frame}\n\n".encode()
        ex.response.force_close()
        try:
            if not ex.response.prepared:
                await self._final_write(ex, None)
            await self._final_write(ex, data)
            await self._final_write(ex, b"", eof=True)
        except _ClientGone:
            self._abort_client(ex)
