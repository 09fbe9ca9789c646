"""A response from a model's server, as :class:`~llmuxd.upstream.Upstream`'s connections receive
it: parsed by httptools (llhttp, the parser of uvicorn, so of vLLM's own server) with its strict
defaults, then relayed as it comes.

What llhttp refuses (a malformed status line or header, a bare CR or LF, NUL or another control
byte in a header, two Content-Length fields, both Content-Length and Transfer-Encoding, obs-fold,
a bad chunk size or chunk end...) and what is refused here (a head or trailers over 64 KiB, a
101 or a status under 100, a version other than HTTP/1.0 or 1.1) is an :class:`UpstreamError`, and
the connection is dropped.  A body without Content-Length or chunked framing ends when the server
closes the connection; a connection that sent more than a response (line ends aside, which
llhttp skips) is not reused.  The body is buffered up to a high-water mark, past which reading
from the backend pauses until the relay takes it.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import httptools

if TYPE_CHECKING:
    from .upstream import _Conn

_MAX_HEAD = 64 * 1024  # response head (and trailers, and what may precede a body byte)
_HIGH_WATER = 256 * 1024  # body bytes buffered before reading from the backend pauses

_HEAD, _BODY, _DONE, _FAILED = range(4)


class UpstreamError(Exception):
    """The backend failed: refused or dropped the connection, answered malformed, or fell silent."""

    #: Nothing at all came back on a kept-alive connection: the server had closed it while idle.
    retryable = False


class Response:
    """A response being received on a connection: status and headers (once :meth:`started`),
    then its body through :meth:`read` or :meth:`read_some`.  Also the callbacks of its parser."""

    __slots__ = ("_conn", "_parser", "status", "headers", "event_stream", "reusable", "got_bytes", "_state",
                 "_until_close", "_head_size", "_since_body", "_body", "_size", "_whole", "_error", "_waiter")

    def __init__(self, conn: _Conn):
        self._conn = conn
        self._parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[str, str]] = []  # as received (hop-by-hop ones too)
        self.event_stream = False  # Content-Type text/event-stream
        self.reusable = False
        self.got_bytes = False
        self._state = _HEAD
        self._until_close = False  # the body ends when the server closes the connection
        self._head_size = 0  # of the head(s) so far, then of the trailers
        self._since_body = 0  # bytes received since the last body byte
        self._body: list[bytes] = []
        self._size = 0
        self._whole = False  # the whole body is wanted at once (read()): no holding back
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future | None = None

    @property
    def ended(self) -> bool:
        """Received whole, or failed."""
        return self._state >= _DONE

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
        self._parser = None  # (it holds this Response's callbacks)
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
        if self._state == _BODY and self._until_close and exc is None:
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
        if self._state >= _DONE:
            if self._state == _DONE:
                self.reusable = False  # bytes after the end
            return
        self._since_body += len(data)
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as e:
            if self._state != _DONE:  # (once done, what follows only makes it not reusable)
                refused = e.__context__
                self._fail(UpstreamError(f"sent {refused}" if isinstance(refused, _Refused)
                                         else f"sent a malformed response: {e}"))
                return
        if self._state < _DONE:
            if self._since_body > _MAX_HEAD:  # a head, a chunk-size line or trailers without end
                self._fail(UpstreamError("sent 64 KiB without a body byte or the end of a response head"))
                return
            if self._state == _HEAD:
                return  # nothing to wake for yet
            if self._size > _HIGH_WATER and not self._whole:
                self._conn.pause()
        self._wake()

    # -- httptools' callbacks (an exception in one makes feed_data raise HttpParserError) ------------
    def on_message_begin(self) -> None:
        if self._state == _DONE:  # another response after this one's end: the server is confused
            self.reusable = False
            raise _Refused("more than the response")

    def on_status(self, reason: bytes) -> None:
        self._head_size += len(reason) + 15

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        if self._head_size > _MAX_HEAD:
            raise _Refused("a response head over 64 KiB" if self._state == _HEAD else "trailers over 64 KiB")
        if self._state == _HEAD:  # (trailers are dropped)
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if status < 200:
            if status == 101 or status < 100:
                raise _Refused(f"status {status}")
            self.headers = []  # interim (100 Continue, 103 Early Hints): the final answer follows
            return
        if parser.get_http_version() not in ("1.1", "1.0"):
            raise _Refused(f"HTTP/{parser.get_http_version()}")
        headers = []
        framed = False
        te = None
        for name, value in self.headers:
            value = value.rstrip(b" \t")
            lname = name.lower()
            if lname == b"content-type":
                self.event_stream = value[:17].lower() == b"text/event-stream"
            elif lname == b"content-length":
                framed = True
            elif lname == b"transfer-encoding":
                te = value  # the last coding of the last one says whether it is chunked
            headers.append((name.decode("ascii"), value.decode("utf-8", "surrogateescape")))
        if te is not None:
            framed = te.rsplit(b",", 1)[-1].strip().lower() == b"chunked"
        self.headers = headers
        self.status = status
        self._until_close = not framed
        self._head_size = 0
        self._state = _BODY

    def on_body(self, data: bytes) -> None:
        self._body.append(data)
        self._size += len(data)
        self._since_body = 0

    def on_message_complete(self) -> None:
        if self._state == _BODY:  # (not an interim response's end)
            self._state = _DONE
            self.reusable = self._parser.should_keep_alive()


class _Refused(Exception):
    """Raised in a parser callback: what the backend sent is refused (the message says what)."""
