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
times the whole of the rest per request.  What a backend sends is checked as strictly as
aiohttp's parser would: status line, header names, no bare CR/LF or NUL, one Content-Length,
chunked framing; anything else is an :class:`UpstreamError` and the connection is dropped.
Every wait is bounded: connecting (:data:`CONNECT_SECS`), and silence while a response is
awaited or relayed (``read_timeout``; not counted while the relay itself holds reading back
because its client is slow).
"""

from __future__ import annotations

import asyncio
import re
from urllib.parse import urlsplit

#: A connection idle longer than this is not reused (vLLM's uvicorn closes idle ones after 5 s).
IDLE_SECS = 2.0
#: Idle connections kept per model; more are closed when their response ends.
MAX_IDLE = 256
CONNECT_SECS = 10.0
#: How long closing waits for the server's side of each idle connection to close.
CLOSE_GRACE_SECS = 1.0
_MAX_HEAD = 64 * 1024  # response head (and trailers)
_MAX_CHUNK_LINE = 1024
_HIGH_WATER = 256 * 1024  # body bytes buffered before reading from the backend pauses
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")

_HEAD, _LENGTH, _CHUNKED, _UNTIL_CLOSE, _DONE, _FAILED = range(6)
_SIZE, _DATA, _DATA_END, _TRAILERS = range(4)  # where a chunked body is


class UpstreamError(Exception):
    """The backend failed: refused or dropped the connection, answered malformed, or fell silent."""

    #: Nothing at all came back on a kept-alive connection: the server had closed it while idle.
    retryable = False


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
            if conn.loop.time() - conn.idle_since > IDLE_SECS:  # and all below it are older still
                conn.close()
                for old in idle:
                    old.idle = False
                    old.close()
                idle.clear()
                return None
            return conn
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
        self.closed = True
        conns, self._idle = self._idle, []
        for c in conns:
            c.idle = False
        waits = [w for w in (c.shutdown() for c in conns) if w is not None]
        try:
            if waits:
                await asyncio.wait(waits, timeout=grace)
        finally:
            for c in conns:
                if not c.lost:
                    c.abort()

    def close_now(self) -> None:
        """Abort every idle connection at once, and open no more (for when the model is gone
        or going without an eviction that could wait: its backend died, llmuxd stops...)."""
        self.closed = True
        conns, self._idle = self._idle, []
        for c in conns:
            c.idle = False
            c.abort()


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
        if resp is None or self.lost or resp._state >= _DONE:
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


class Response:
    """A response being received on a connection: status and headers (once :meth:`started`),
    then its body through :meth:`read` or :meth:`read_some`."""

    __slots__ = ("_conn", "status", "headers", "event_stream", "reusable", "got_bytes", "_state", "_rest", "_left",
                 "_chunk", "_body", "_size", "_whole", "_error", "_waiter")

    def __init__(self, conn: _Conn):
        self._conn = conn
        self.status = 0
        self.headers: list[tuple[str, str]] = []  # as received (hop-by-hop ones too)
        self.event_stream = False  # Content-Type text/event-stream
        self.reusable = False
        self.got_bytes = False
        self._state = _HEAD
        self._rest = b""  # received, not yet parsed (a partial head, chunk-size line...)
        self._left = 0  # body bytes left (Content-Length), or of the current chunk
        self._chunk = _SIZE
        self._body: list[bytes] = []
        self._size = 0
        self._whole = False  # the whole body is wanted at once (read()): no holding back
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future | None = None

    # -- the consumer's side -------------------------------------------------------------------------
    async def started(self) -> None:
        while self._state == _HEAD:
            await self._wait()
        if self._state == _FAILED and not self.status:
            raise self._error

    async def read(self) -> bytes:
        """The whole body."""
        if self._state < _DONE:
            self._whole = True
            if self._conn.paused:
                self._conn.resume()
            while self._state < _DONE:
                await self._wait()
        if self._state == _FAILED:
            raise self._error
        return self._take()

    async def read_some(self) -> bytes:
        """The body bytes received since the last call (waits for some); b"" at the end."""
        while not self._body:
            if self._state >= _DONE:
                if self._state == _FAILED:
                    raise self._error
                return b""
            await self._wait()
        return self._take()

    def _take(self) -> bytes:
        body = self._body
        data = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        self._size = 0
        if self._conn.paused:
            self._conn.resume()
        return data

    async def _wait(self) -> None:
        self._waiter = fut = self._conn.loop.create_future()
        try:
            await fut
        finally:
            self._waiter = None

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def release(self) -> None:
        """Done with it: a connection whose response was received whole (and may be kept) goes
        back to its pool; any other is aborted (the backend sees its request abandoned)."""
        conn = self._conn
        if conn.resp is not self:
            return
        conn.resp = None
        if self._state == _DONE and self.reusable:
            if conn.paused:
                conn.resume()
            conn.upstream._put_back(conn)
        elif self._state == _DONE:
            conn.close()
        else:
            conn.abort()

    # -- the connection's side -----------------------------------------------------------------------
    def _fail(self, error: UpstreamError) -> None:
        if self._state < _DONE:
            self._state = _FAILED
            self._error = error
            self._wake()
        self._conn.abort()

    def _eof(self, exc: BaseException | None = None) -> None:
        if self._state == _UNTIL_CLOSE and exc is None:
            self._state = _DONE
            self._wake()
        elif self._state < _DONE:
            if exc is None or isinstance(exc, ConnectionError):
                err = UpstreamError("closed the connection" + (f" ({exc})" if exc else "") +
                                    (" mid-response" if self.got_bytes else " without answering"))
            else:
                err = UpstreamError(f"connection failed: {exc}")
            err.retryable = not self.got_bytes
            self._fail(err)

    def _feed(self, data: bytes) -> None:
        self.got_bytes = True
        if self._rest:
            data = self._rest + data
            self._rest = b""
        state = self._state
        if state == _HEAD:
            data = self._feed_head(data)
            if data is None:
                return
            state = self._state
            if not data:
                return
        if state == _LENGTH:
            left = self._left
            if len(data) >= left:
                if len(data) > left:  # more than it announced: the connection is not kept
                    self.reusable = False
                    data = data[:left]
                self._state = _DONE
            self._left = left - len(data)
            if data:
                self._body.append(data)
                self._size += len(data)
        elif state == _CHUNKED:
            self._feed_chunked(data)
        elif state == _UNTIL_CLOSE:
            self._body.append(data)
            self._size += len(data)
        elif state == _DONE:
            self.reusable = False  # bytes after the end
            return
        else:
            return
        if self._size > _HIGH_WATER and self._state < _DONE and not self._whole:
            self._conn.pause()
        self._wake()

    def _feed_head(self, data: bytes) -> bytes | None:
        """Parse the head if it is all there; returns what follows it (None: wait for more)."""
        while True:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                if len(data) > _MAX_HEAD:
                    self._fail(UpstreamError("sent a response head over 64 KiB"))
                else:
                    self._rest = data
                return None
            if end > _MAX_HEAD:
                self._fail(UpstreamError("sent a response head over 64 KiB"))
                return None
            head, data = data[:end], data[end + 4:]
            if not self._parse_head(head):
                return None
            if self._state != _HEAD:  # a final answer (an interim 1xx is skipped)
                self._wake()
                return data

    def _parse_head(self, head: bytes) -> bool:
        lines = head.split(b"\r\n")
        n = len(lines) - 1
        if head.count(b"\r") != n or head.count(b"\n") != n or b"\x00" in head:
            return self._malformed("a bare CR, LF or NUL in its response head")
        line = lines[0]
        if len(line) < 12 or line[:7] != b"HTTP/1." or line[7] not in b"01" or line[8] != 32 or \
                not line[9:12].isdigit() or (len(line) > 12 and line[12] != 32):
            return self._malformed(f"a malformed status line {line[:80]!r}")
        status = int(line[9:12])
        if status < 100:
            return self._malformed(f"status {status}")
        keep = line[7] == 49  # HTTP/1.1
        length = None
        te = None
        event_stream = False
        headers = []
        for line in lines[1:] if n else ():
            name, colon, value = line.partition(b":")
            if not colon or not _TOKEN.fullmatch(name):
                return self._malformed(f"a malformed header line {line[:80]!r}")
            value = value.strip(b" \t")
            lname = name.lower()
            if lname == b"content-length":
                if not value.isdigit() or len(value) > 18 or (length is not None and int(value) != length):
                    return self._malformed(f"a bad Content-Length {value[:40]!r}")
                length = int(value)
            elif lname == b"transfer-encoding":
                te = (te + b"," + value) if te else value
            elif lname == b"connection":
                if b"close" in [t.strip() for t in value.lower().split(b",")]:
                    keep = False
            elif lname == b"content-type":
                event_stream = value[:17].lower() == b"text/event-stream"
            headers.append((name.decode("ascii"), value.decode("utf-8", "surrogateescape")))
        if status < 200:
            if status == 101:
                return self._malformed("101 Switching Protocols to a POST")
            return True  # interim (100 Continue, 103 Early Hints): the final answer follows
        self.status = status
        self.headers = headers
        self.event_stream = event_stream
        if status in (204, 304):
            self._state = _DONE
        elif te is not None:
            codings = [c.strip() for c in te.lower().split(b",")]
            if codings[-1] == b"chunked" and codings.count(b"chunked") == 1:
                self._state = _CHUNKED
                if length is not None:  # both: chunked wins, the connection is not kept
                    keep = False
            else:
                self._state = _UNTIL_CLOSE
                keep = False
        elif length is not None:
            self._left = length
            self._state = _LENGTH if length else _DONE
        else:
            self._state = _UNTIL_CLOSE
            keep = False
        self.reusable = keep
        return True

    def _malformed(self, what: str) -> bool:
        self._fail(UpstreamError(f"sent {what}"))
        return False

    def _feed_chunked(self, data: bytes) -> None:
        pos, n = 0, len(data)
        body = self._body
        while pos < n:
            step = self._chunk
            if step == _DATA:
                take = min(self._left, n - pos)
                body.append(data[pos:pos + take] if take < n else data)
                self._size += take
                pos += take
                self._left -= take
                if self._left:
                    break
                self._chunk = _DATA_END
            elif step == _DATA_END:
                if n - pos < 2:
                    break
                if data[pos:pos + 2] != b"\r\n":
                    self._malformed("a chunk not followed by CRLF")
                    return
                pos += 2
                self._chunk = _SIZE
            elif step == _SIZE:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    if n - pos > _MAX_CHUNK_LINE:
                        self._malformed("a chunk-size line over 1 KiB")
                        return
                    break
                size = data[pos:eol].split(b";", 1)[0].rstrip(b" \t")
                if not _HEX.fullmatch(size):
                    self._malformed(f"a bad chunk size {size[:20]!r}")
                    return
                pos = eol + 2
                self._left = int(size, 16)
                self._chunk = _DATA if self._left else _TRAILERS
            else:  # trailers, ignored, up to the empty line
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    if n - pos > _MAX_HEAD:
                        self._malformed("trailers over 64 KiB")
                        return
                    break
                line = data[pos:eol]
                pos = eol + 2
                if not line:
                    self._state = _DONE
                    if pos < n:
                        self.reusable = False
                    return
                if b"\r" in line or b"\n" in line or b"\x00" in line:
                    self._malformed("a bare CR, LF or NUL in its trailers")
                    return
        if pos < n:
            self._rest = data[pos:]
