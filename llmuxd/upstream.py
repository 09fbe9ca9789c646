"""Kept-alive HTTP/1.1 connections to one model's server, for one awake period of that model.

The switcher makes an :class:`Upstream` for a model when it admits the first request after the
model woke, hands it to every request it admits (``Route.upstream``), and closes it when the
model leaves its awake state: on an eviction after the drain and *before* the model sleeps,
is suspended or is checkpointed.  A connection left open into a model's process tree would be
dumped with the tree (CRIU ``--tcp-established``) and be dead after a restore, so:

* a closed Upstream holds no idle connection (each was shut down, the server's side closed
  too, within :data:`CLOSE_GRACE_SECS`, then aborted) and opens none: a request asks for one
  in vain (:class:`UpstreamClosed`);
* a connection still in use when it closes (``drain_before_switch: false``) is closed when
  its response ends instead of going back to the pool;
* the next request admitted gets a new Upstream, so a fresh connection.

This is a small client of its own rather than aiohttp's: the proxy's hot path needs little
(POST, a body in memory, a response relayed as it comes) and aiohttp's client costs several
times the whole of the rest per request.  Responses are parsed by httptools (llhttp), strictly
(:mod:`llmuxd.upstream_response`).  Every wait is bounded: connecting (:data:`CONNECT_SECS`),
and silence while a response is awaited or relayed (``read_timeout``; not counted while the
relay itself holds reading back because its client is slow).
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

from .upstream_response import Response, UpstreamError

#: A connection idle longer than this is not reused (vLLM's uvicorn closes idle ones after 5 s).
IDLE_SECS = 2.0
#: Idle connections kept per model; more are closed when their response ends.
MAX_IDLE = 256
CONNECT_SECS = 10.0
#: How long closing waits for the server's side of each idle connection to close.
CLOSE_GRACE_SECS = 1.0


class UpstreamTimeout(UpstreamError):
    pass


class UpstreamClosed(Exception):
    """The model's Upstream was closed (it is being evicted): no connection is to be opened."""


class Upstream:
    """The pool of one model's connections during one awake period (see the module's docstring)."""

    def __init__(self, url: str, read_timeout: float):
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"not an http:// URL: {url!r}")
        self.url = url
        self.host = parts.hostname
        self.port = parts.port or 80
        self.host_header = parts.netloc.encode("ascii")
        self.read_timeout = read_timeout
        self.closed = False
        self.opened = 0  # connections opened, over this Upstream's life (for the benchmarks)
        self._idle: list[_Conn] = []  # most recently used last

    # -- requests -------------------------------------------------------------------------------
    async def request(self, head: bytes, body: bytes) -> Response:
        """Send a request (``head``, ``body``: see :meth:`_Conn.send`) on a kept-alive connection
        or a new one, and wait for its response's status and headers.  The caller must
        :meth:`Response.release` the response however it ends."""
        if self.closed:
            raise UpstreamClosed()
        conn = self._reuse()
        if conn is not None:
            resp = conn.send(head, body)
            try:
                await resp.started()
                return resp
            except UpstreamError as e:
                resp.release()
                # The server closed it while idle, before reading the request (nothing came
                # back): the request was not seen, it goes once more on a new connection.
                if not e.retryable:
                    raise
            except BaseException:
                resp.release()
                raise
            if self.closed:
                raise UpstreamClosed()
        conn = await self._connect()
        resp = conn.send(head, body)
        try:
            await resp.started()
        except BaseException:
            resp.release()
            raise
        return resp

    def _reuse(self) -> _Conn | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            conn.idle = False
            if conn.lost or conn.transport.is_closing():
                continue
            if conn.loop.time() - conn.idle_since <= IDLE_SECS:
                return conn
            conn.close()  # idle too long (and all below it are older still)
        return None

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(CONNECT_SECS):
                _, conn = await loop.create_connection(lambda: _Conn(self, loop), self.host, self.port)
        except TimeoutError:
            raise UpstreamError(f"no connection within {CONNECT_SECS:g} s") from None
        except OSError as e:
            raise UpstreamError(f"cannot connect to {self.url}: {e.strerror or e}") from None
        self.opened += 1
        if self.closed:  # closed while connecting
            conn.abort()
            raise UpstreamClosed()
        return conn

    def _put_back(self, conn: _Conn) -> None:
        if self.closed or conn.lost or len(self._idle) >= MAX_IDLE:
            conn.close()
            return
        conn.idle = True
        conn.idle_since = conn.loop.time()
        self._idle.append(conn)

    def _forget(self, conn: _Conn) -> None:
        if conn.idle:
            conn.idle = False
            try:
                self._idle.remove(conn)
            except ValueError:
                pass

    @property
    def idle(self) -> int:
        return len(self._idle)

    # -- closing --------------------------------------------------------------------------------
    async def aclose(self, grace: float = CLOSE_GRACE_SECS) -> None:
        """Close every idle connection — each is shut down for writing, and awaited until the
        server has closed its side too (at most ``grace``, then aborted) — and open no more."""
        conns = self._close()
        waits = [w for w in (c.shutdown() for c in conns) if w is not None]
        try:
            if waits:
                await asyncio.wait(waits, timeout=grace)
        finally:
            for c in conns:
                c.abort()

    def close_now(self) -> None:
        """Abort every idle connection at once, and open no more (for when the model is gone
        or going without an eviction that could wait: its backend died, llmuxd stops...)."""
        for c in self._close():
            c.abort()

    def _close(self) -> list[_Conn]:
        self.closed = True
        conns, self._idle = self._idle, []
        for c in conns:
            c.idle = False
        return conns


class _Conn(asyncio.Protocol):
    """One connection: at most one request on it at a time."""

    def __init__(self, upstream: Upstream, loop: asyncio.AbstractEventLoop):
        self.upstream = upstream
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.resp: Response | None = None
        self.idle = False
        self.idle_since = 0.0
        self.lost = False
        self.paused = False
        self.last_data = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._lost_fut: asyncio.Future | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        resp = self.resp
        if resp is None:  # the server spoke out of turn: nothing it says now can be trusted
            self.abort()
            return
        self.last_data = self.loop.time()
        resp._feed(data)

    def eof_received(self) -> bool:
        resp = self.resp
        if resp is not None:
            resp._eof()
        return False  # close our side too

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = True
        self.upstream._forget(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        resp = self.resp
        if resp is not None:
            resp._eof(exc)
        if self._lost_fut is not None and not self._lost_fut.done():
            self._lost_fut.set_result(None)

    # -- requests ---------------------------------------------------------------------------------
    def send(self, head: bytes, body: bytes) -> Response:
        """``head``: the request line and header fields, each line ending in CRLF, without the
        blank line that ends the head and without Host and Content-Length (added here)."""
        resp = self.resp = Response(self)
        self.last_data = self.loop.time()
        if self._timer is None:
            self._timer = self.loop.call_at(self.last_data + self.upstream.read_timeout, self._check_silence)
        head = b"%sHost: %s\r\nContent-Length: %d\r\n\r\n" % (head, self.upstream.host_header, len(body))
        if len(body) < 16384:
            self.transport.write(head + body)
        else:
            self.transport.write(head)
            self.transport.write(body)
        return resp

    def _check_silence(self) -> None:
        """The read timeout: one timer per busy connection, moved on lazily (not per read)."""
        self._timer = None
        resp = self.resp
        if resp is None or self.lost or resp.ended:
            return  # idle now: the next request arms it again
        timeout = self.upstream.read_timeout
        now = self.loop.time()
        if self.paused:  # the relay holds reading back: its client is slow, not the backend
            due = now + timeout
        else:
            due = self.last_data + timeout
            if now >= due:
                resp._fail(UpstreamTimeout(f"nothing for {timeout:g} s"))
                return
        self._timer = self.loop.call_at(due, self._check_silence)

    def pause(self) -> None:
        if not self.paused and not self.lost:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            self.last_data = self.loop.time()
            if not self.lost:
                self.transport.resume_reading()

    # -- ending ------------------------------------------------------------------------------------
    def close(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.abort()

    def shutdown(self) -> asyncio.Future | None:
        """Half-close (FIN); the returned future is done once the connection is gone (the
        server closes its side on our FIN, then we close ours)."""
        if self.lost or self.transport is None:
            return None
        self._lost_fut = self.loop.create_future()
        try:
            self.transport.write_eof()
        except (OSError, RuntimeError):
            self.abort()
        return self._lost_fut
