"""The proxy's upstream connections (llmuxd/upstream.py) and who closes them: in-process, against
scripted servers that answer byte for byte (well-formed, malformed, stalled, closing), and the
switcher's rule that no kept-alive connection goes into an eviction."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest
from aiohttp import web

from llmuxd.config import parse_config
from llmuxd.events import State
from llmuxd.switcher import Switcher
from llmuxd.upstream import Upstream, UpstreamClosed, UpstreamError, UpstreamTimeout


class Scripted:
    """A server answering each request (read whole: Content-Length bodies) with the script for
    its path (a list, or a function returning one): bytes are written, ``"pause"`` sleeps
    50 ms, ``"close"`` closes.  Records what it saw: requests, connections, EOFs."""

    def __init__(self, scripts: dict[str, list]):
        self.scripts = scripts
        self.requests: list[bytes] = []
        self.connections = 0
        self.eofs = 0

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    self.eofs += 1
                    return
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                await reader.readexactly(length)
                self.requests.append(head)
                script = self.scripts[head.split(b" ")[1].decode()]
                for step in script() if callable(script) else script:
                    if step == "pause":
                        await asyncio.sleep(0.05)
                    elif step == "close":
                        return
                    else:
                        writer.write(step)
                        await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


def post(up: Upstream, path: str, body: bytes = b"{}"):
    return up.request(b"POST %s HTTP/1.1\r\nX-Test: 1\r\n" % path.encode(), body)


async def body_of(up: Upstream, path: str) -> tuple[int, bytes, bool]:
    resp = await post(up, path)
    try:
        data = b""
        while chunk := await resp.read_some():
            data += chunk
        return resp.status, data, resp.event_stream
    finally:
        resp.release()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_framings_and_reuse():
    async def go():
        sse = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n7;x=y\r\ndata: a\r\n2\r\n\n\n\r\n0\r\nX-Trailer: t\r\n\r\n")
        srv = Scripted({
            "/len": [b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"],
            "/sse": [bytes([b]) for b in sse],  # one byte at a time
            "/close": [b"HTTP/1.1 200 OK\r\n\r\nuntil", "pause", b" close", "close"],
            "/empty": [b"HTTP/1.1 204 No Content\r\n\r\n"],
        })
        up = Upstream(f"http://127.0.0.1:{await srv.start()}", read_timeout=5)
        assert await body_of(up, "/len") == (200, b"{}", False)
        assert await body_of(up, "/sse") == (200, b"data: a\n\n", True)
        assert await body_of(up, "/empty") == (204, b"", False)
        assert await body_of(up, "/len") == (200, b"{}", False)
        assert srv.connections == 1 and up.idle == 1  # one connection, kept alive
        assert srv.requests[0].startswith(b"POST /len HTTP/1.1\r\nX-Test: 1\r\nHost: 127.0.0.1:")
        assert b"\r\nContent-Length: 2" in srv.requests[0]
        assert await body_of(up, "/close") == (200, b"until close", False)
        assert up.idle == 0  # read until close: not kept
        resp = await post(up, "/len")
        assert await resp.read() == b"{}" and [k for k, _ in resp.headers] == ["Content-Type", "Content-Length"]
        resp.release()
        assert srv.connections == 2

    run(go())


MALFORMED = {
    "two Content-Length": b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx",
    "signed Content-Length": b"HTTP/1.1 200 OK\r\nContent-Length: +1\r\n\r\nx",
    "status line": b"HTTP/1.1 20 OK\r\n\r\n",
    "not HTTP": b"SSH-2.0-OpenSSH\r\n\r\n",
    "space in a name": b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
    "bare CR": b"HTTP/1.1 200 OK\r\nX: a\rb\r\nContent-Length: 0\r\n\r\n",
    "bare LF": b"HTTP/1.1 200 OK\r\nX: a\nb: c\r\nContent-Length: 0\r\n\r\n",
    "NUL": b"HTTP/1.1 200 OK\r\nX: a\x00\r\nContent-Length: 0\r\n\r\n",
    "chunk size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x1\r\nx\r\n0\r\n\r\n",
    "chunk end": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nxy\r\n0\r\n\r\n",
    "head too large": b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000 + b"\r\n\r\n",
    "switching protocols": b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    # Shapes of response smuggling and desynchronisation: each one is refused, none is guessed at.
    "Content-Length and chunked": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
                                  b"1\r\nx\r\n0\r\n\r\n",
    "chunked and Content-Length": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
                                  b"1\r\nx\r\n0\r\n\r\n",
    "two equal Content-Length": b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
    "Content-Length list": b"HTTP/1.1 200 OK\r\nContent-Length: 1, 1\r\n\r\nx",
    "space before a colon": b"HTTP/1.1 200 OK\r\nContent-Length : 1\r\n\r\nx",
    "obs-fold": b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 0\r\n\r\n",
    "control byte": b"HTTP/1.1 200 OK\r\nX: a\x01b\r\nContent-Length: 0\r\n\r\n",
    "negative chunk size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\nx\r\n0\r\n\r\n",
    "chunk size overflow": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1" + b"0" * 16 +
                           b"\r\nx\r\n0\r\n\r\n",
    "space after a chunk size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1 \r\nx\r\n0\r\n\r\n",
    "chunk size ended by LF": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\nx\r\n0\r\n\r\n",
    "NUL in trailers": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: a\x00\r\n\r\n",
    "HTTP/2.0": b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    "HTTP/0.9": b"HTTP/0.9 200 OK\r\nContent-Length: 0\r\n\r\n",
    "status under 100": b"HTTP/1.1 099 OK\r\nContent-Length: 0\r\n\r\n",
}


@pytest.mark.parametrize("what", list(MALFORMED))
def test_malformed_answers_are_refused(what):
    async def go():
        srv = Scripted({"/bad": [MALFORMED[what]], "/ok": [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]})
        up = Upstream(f"http://127.0.0.1:{await srv.start()}", read_timeout=5)
        with pytest.raises(UpstreamError):
            await body_of(up, "/bad")
        assert up.idle == 0
        assert await body_of(up, "/ok") == (200, b"ok", False)
        assert srv.connections == 2  # the bad one was dropped

    run(go())


def test_heads_and_framing_are_bounded():
    """A head, trailers or a chunk-size line without end are refused at 64 KiB, whether they
    come in one piece or several; the connection is kept open, so the bound refuses, not an EOF."""
    async def go():
        srv = Scripted({
            "/one": [b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000 + b"\r\nContent-Length: 0\r\n\r\n"],
            "/pieces": [b"HTTP/1.1 200 OK\r\nX: " + b"a" * 40000, "pause", b"a" * 40000],
            "/interim": [b"HTTP/1.1 103 Early Hints\r\nLink: " + b"a" * 1000 + b"\r\n\r\n"] * 70,
            "/trailers": [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n",
                          *[b"X-T: " + b"t" * 1000 + b"\r\n"] * 70],
            "/extension": [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n1;e=",
                           *["pause", b"e" * 10000] * 8],  # (counted from the read after the body byte's)
        })
        up = Upstream(f"http://127.0.0.1:{await srv.start()}", read_timeout=5)
        for path, body in [("/one", b""), ("/pieces", b""), ("/interim", b""), ("/trailers", b"x"),
                           ("/extension", b"x")]:
            resp = await post(up, path) if body else None
            try:
                with pytest.raises(UpstreamError, match="64 KiB"):
                    if resp is None:
                        await body_of(up, path)
                    else:
                        assert await resp.read_some() == body
                        await resp.read()
            finally:
                if resp is not None:
                    resp.release()
        assert up.idle == 0 and srv.connections == 5

    run(go())


def test_bytes_after_a_response_are_not_taken_for_the_next():
    async def go():
        srv = Scripted({"/extra": [b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\naHTTP/1.1 200 OK\r\n\r\n"],
                        "/nobody": [b"HTTP/1.1 204 No Content\r\nContent-Length: 3\r\n\r\nabc"],
                        "/ok": [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]})
        up = Upstream(f"http://127.0.0.1:{await srv.start()}", read_timeout=5)
        assert await body_of(up, "/extra") == (200, b"a", False)
        assert up.idle == 0  # delivered, but the connection is not reused
        assert await body_of(up, "/nobody") == (204, b"", False)  # a 204 has no body, whatever it says
        assert up.idle == 0
        assert await body_of(up, "/ok") == (200, b"ok", False)
        assert up.idle == 1 and srv.connections == 3

    run(go())


def test_silence_is_bounded_and_the_request_abandoned():
    async def go():
        srv = Scripted({"/head": ["pause"] * 100,
                        "/stall": [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n", *["pause"] * 100]})
        up = Upstream(f"http://127.0.0.1:{await srv.start()}", read_timeout=0.5)
        t = time.monotonic()
        with pytest.raises(UpstreamTimeout):
            await post(up, "/head")
        assert 0.45 < time.monotonic() - t < 2
        resp = await post(up, "/stall")
        assert await resp.read_some() == b"a"
        t = time.monotonic()
        with pytest.raises(UpstreamTimeout):
            await resp.read_some()
        assert 0.45 < time.monotonic() - t < 2
        resp.release()
        assert up.idle == 0 and srv.connections == 2  # each abandoned: its connection too

    run(go())


def test_a_kept_alive_connection_the_server_closed_is_retried_once():
    """The server reads the second request on the kept-alive connection and closes it without
    a byte (as a server closing an idle connection does): sent once more, on a new connection."""
    async def go():
        answers = [[b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na"], ["close"],
                   [b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb"]]
        srv = Scripted({"/a": lambda: answers.pop(0)})
        up = Upstream(f"http://127.0.0.1:{await srv.start()}", read_timeout=5)
        assert await body_of(up, "/a") == (200, b"a", False)
        assert await body_of(up, "/a") == (200, b"b", False)
        assert srv.connections == 2 and len(srv.requests) == 3
        # A failure after bytes came back is not retried.
        srv.scripts["/a"] = [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab", "close"]
        with pytest.raises(UpstreamError, match="mid-response"):
            await body_of(up, "/a")

    run(go())


def test_closing_leaves_no_connection_and_opens_none():
    async def go():
        srv = Scripted({"/a": [b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na"],
                        "/slow": [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n1", "pause", "pause", b"2"]})
        up = Upstream(f"http://127.0.0.1:{await srv.start()}", read_timeout=5)
        await asyncio.gather(body_of(up, "/a"), body_of(up, "/a"), body_of(up, "/a"))
        assert up.idle == 3 and srv.connections == 3
        busy = await post(up, "/slow")  # in use while the pool closes
        t = time.monotonic()
        await up.aclose()
        assert time.monotonic() - t < 0.5 and up.idle == 0
        assert srv.eofs == 2  # each idle one half-closed, and closed by the server too, before aclose returned
        with pytest.raises(UpstreamClosed):
            await post(up, "/a")
        assert await busy.read() == b"12"
        busy.release()  # done, but its pool is closed: closed, not kept
        assert up.idle == 0
        await asyncio.sleep(0.05)
        assert srv.eofs == 3 and srv.connections == 3

    run(go())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_switcher_closes_a_models_connections_before_it_sleeps(tmp_path):
    """Drain, close the kept-alive connections, then sleep; the next admission gets a new pool
    (a fresh connection); a model that stops otherwise (its backend died) drops its pool too."""
    async def go():
        seen = []

        async def answer(request: web.Request) -> web.Response:
            await request.read()
            seen.append(request.transport.get_extra_info("peername"))
            return web.json_response({"ok": True})

        app = web.Application()
        app.router.add_post("/v1/x", answer)
        runner = web.AppRunner(app)
        await runner.setup()
        port = _free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        cfg = parse_config({"models": {"m1": {"model_path": "x", "port": port}}, "log_dir": str(tmp_path)})
        sw = Switcher(cfg)
        model = sw.models["m1"]
        model.set_state(State.AWAKE)
        sw.active = "m1"

        async def relay() -> None:
            lease = await sw.admit("m1")
            try:
                resp = await lease.route.upstream.request(b"POST /v1/x HTTP/1.1\r\n", b"{}")
                assert json.loads(await resp.read()) == {"ok": True}
                resp.release()
            finally:
                sw.release(lease)

        await relay()
        await relay()
        first = sw._routes["m1"].upstream
        assert first.opened == 1 and first.idle == 1 and len(set(seen)) == 1

        at_sleep = {}

        async def sleep(*, background: bool = False, start_after=None) -> float:
            at_sleep.update(closed=first.closed, idle=first.idle)
            model.set_state(State.ASLEEP)
            return 0.0

        model.sleep = sleep
        await sw._evict("m1", for_switch=False)
        assert at_sleep == {"closed": True, "idle": 0}
        model.set_state(State.AWAKE)
        sw.active = "m1"
        await relay()
        second = sw._routes["m1"].upstream
        assert second is not first and second.opened == 1 and len(set(seen)) == 2
        model.set_state(State.STOPPED)  # e.g. the backend died
        assert second.closed and second.idle == 0 and "m1" not in sw._routes
        await runner.cleanup()

    run(go())
