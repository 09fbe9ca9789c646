"""Liveness with broken or hostile peers: a stalled stream during a switch (drain deadline),
stalled backends (read timeout), clients that go away or stop reading, trickling clients,
bodies without Content-Length, deep JSON, a full wait queue.  Real daemon, real backends."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx

from conftest import model_entry
from harness import free_ports, raw_http, wait_until
from test_http_security import echo_daemon, envelope, request  # noqa: F401 - a fixture
from test_switching import metric


def sse_errors(text: str) -> list[dict]:
    return [json.loads(f[len("data: "):])["error"] for f in text.split("\n\n")
            if f.startswith("data: {") and '"error"' in f]


def test_stalled_stream_does_not_freeze_the_next_switch(echo_daemon):
    """m1's backend stops sending mid-stream.  A wake of m2 drains m1 for drain_timeout_secs,
    then ends the stream with an SSE error frame and switches; control calls answer throughout;
    a later switch back is not frozen either."""
    d, received = echo_daemon(policy={"drain_timeout_secs": 1.5})
    d.control("wake", "m1")
    got: dict = {}

    def stalled_client():
        with httpx.stream("POST", d.url + "/v1/completions", json={"model": "m1", "prompt": "stall", "stream": True},
                          timeout=60) as r:
            got["status"] = r.status_code
            got["body"] = r.read().decode()
            got["ended"] = time.monotonic()

    t = threading.Thread(target=stalled_client)
    t.start()
    wait_until(lambda: any(e.get("event") == "stalling" for e in received()), 10, what="the stream to stall")
    started = time.monotonic()
    switch = threading.Thread(target=lambda: got.setdefault("wake", d.control("wake", "m2")))
    switch.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    st = d.status()  # the control API answers while the drain waits
    assert time.monotonic() - t0 < 1.0 and st["switching"] == {"from": "m1", "to": "m2"}
    switch.join(30)
    t.join(30)
    took = time.monotonic() - started
    assert got["wake"].status_code == 200 and got["wake"].json()["state"] == "awake"
    assert 1.4 <= took < 10, took
    assert got["status"] == 200 and got["body"].startswith('data: {"choices": [{"text": "first"}]}\n\n')
    errors = sse_errors(got["body"])
    assert len(errors) == 1 and errors[0]["code"] == "model_evicted" and "drain deadline" in errors[0]["message"]
    assert got["body"].endswith("\n\n") and "[DONE]" not in got["body"]
    assert d.status()["active_model"] == "m2" and d.status()["models"]["m1"]["in_flight"] == 0
    assert metric(d, "llmuxd_requests_total", model="m1", status="evicted") == 1
    assert "drain deadline" in d.log() and "Traceback" not in d.log()
    # Not frozen: the next switch and a request are served as usual.
    assert d.control("wake", "m1").json()["state"] == "awake"
    assert httpx.post(d.url + "/v1/completions", json={"model": "m1", "prompt": "x"}, timeout=30).status_code == 200


def test_unanswered_request_at_the_drain_deadline_gets_503(echo_daemon):
    d, _ = echo_daemon(policy={"drain_timeout_secs": 1})
    d.control("wake", "m1")
    got = {}
    t = threading.Thread(target=lambda: got.setdefault("r", httpx.post(
        d.url + "/v1/completions", json={"model": "m1", "prompt": "stall-head"}, timeout=60)))
    t.start()
    wait_until(lambda: d.status()["models"]["m1"]["in_flight"] == 1, 10, what="request in flight")
    assert d.control("wake", "m2").status_code == 200
    t.join(30)
    r = got["r"]
    assert r.status_code == 503 and envelope(r)["code"] == "model_evicted" and r.headers["Retry-After"]


def test_upstream_read_timeout(echo_daemon):
    d, received = echo_daemon(models=("m1",), policy={"upstream_read_timeout_secs": 1})
    t0 = time.monotonic()
    r = httpx.post(d.url + "/v1/completions", json={"model": "m1", "prompt": "stall-head"}, timeout=30)
    assert r.status_code == 502 and envelope(r)["code"] == "backend_died", r.text
    assert "stopped answering" in envelope(r)["message"] and time.monotonic() - t0 < 10
    r = httpx.post(d.url + "/v1/completions", json={"model": "m1", "prompt": "stall", "stream": True}, timeout=30)
    assert r.status_code == 200 and r.text.startswith('data: {"choices"')
    assert [e["code"] for e in sse_errors(r.text)] == ["backend_died"]
    # Both upstream requests were aborted, not left hanging in the backend.
    wait_until(lambda: sum(e.get("event") == "disconnected" for e in received()) == 2, 5, what="upstream aborts")
    assert d.status()["models"]["m1"]["state"] == "awake"  # a slow answer is not a dead backend


def test_split_frames_are_relayed_whole(echo_daemon):
    """The backend writes a frame in two halves, 0.3 s apart: the client gets it in one piece
    (so a final error frame could never land inside a half-relayed one), bytes unchanged."""
    d, _ = echo_daemon(models=("m1",))
    frame = b'data: {"choices": [{"text": "whole"}]}\n\n'
    r = raw_http(d.port, request("POST", "/v1/completions", b'{"model":"m1","prompt":"split","stream":true}'), 30)
    assert r.status == 200 and r.body == frame + b"data: [DONE]\n\n"
    first_chunk_size = int(r.raw.partition(b"\r\n\r\n")[2].split(b"\r\n", 1)[0], 16)
    assert first_chunk_size >= len(frame)  # [DONE] may come along in the same read


def test_client_gone_mid_stream_aborts_upstream(echo_daemon):
    d, received = echo_daemon(models=("m1",))
    d.control("wake", "m1")
    with socket.create_connection(("127.0.0.1", d.port)) as s:
        s.sendall(request("POST", "/v1/completions", b'{"model": "m1", "prompt": "slow", "stream": true}'))
        buf = b""
        while buf.count(b"data: ") < 3:
            buf += s.recv(65536)
    gone = time.monotonic()
    wait_until(lambda: any(e.get("event") == "disconnected" and e.get("prompt") == "slow" for e in received()), 5,
               what="the backend to see its request aborted")
    assert time.monotonic() - gone < 2
    wait_until(lambda: metric(d, "llmuxd_requests_total", model="m1", status="client_closed") == 1, 5,
               what="client_closed counted")
    assert metric(d, "llmuxd_requests_total", model="m1", status="502") == 0
    assert d.status()["models"]["m1"]["in_flight"] == 0 and d.status()["models"]["m1"]["state"] == "awake"
    assert "Traceback" not in d.log() and " ERROR " not in d.log()


def test_client_that_stops_reading_is_disconnected(echo_daemon):
    d, received = echo_daemon(models=("m1",), client_timeout_secs=1.5)
    d.control("wake", "m1")
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", d.port))
        s.sendall(request("POST", "/v1/completions", b'{"model": "m1", "prompt": "flood", "stream": true}'))
        wait_until(lambda: metric(d, "llmuxd_requests_total", model="m1", status="client_timeout") == 1, 20,
                   what="the non-reading client to be dropped")
    wait_until(lambda: any(e.get("event") == "disconnected" for e in received()), 5, what="upstream aborted")
    assert d.status()["models"]["m1"]["in_flight"] == 0


def test_chunked_bodies_are_held_to_the_limit(make_daemon):
    d = make_daemon(max_request_bytes=4096)

    def chunked(body: bytes, piece: int = 1000) -> bytes:
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        parts = [body[i:i + piece] for i in range(0, len(body), piece)]
        return head + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"

    big = json.dumps({"model": "m1", "prompt": "x" * 5000}).encode()
    r = raw_http(d.port, chunked(big))
    assert r.status == 413 and envelope(r)["code"] == "payload_too_large"
    ok = json.dumps({"model": "m1", "prompt": "y" * 3000, "max_tokens": 2}).encode()
    r = raw_http(d.port, chunked(ok, 100), timeout=60)
    assert r.status == 200 and r.json()["choices"], r.raw[:300]
    assert d.status()["models"]["m1"]["state"] == "awake"


def test_deep_json_is_a_400(make_daemon):
    d = make_daemon()
    url = d.url + "/v1/completions"
    for body in (b"[" * 100_000, b"[" * 100_000 + b"]" * 100_000, b'{"model":"m1","x":' + b"[" * 65 + b"]" * 65 + b"}",
                 b'{"model":"m1","x":' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}"):
        t0 = time.monotonic()
        r = httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=30)
        assert r.status_code == 400 and "deeper than 64" in envelope(r)["message"], r.text[:200]
        assert time.monotonic() - t0 < 5
    ok = b'{"model":"m1","max_tokens":2,"prompt":"p","x":' + b"[" * 63 + b"]" * 63 + b"}"
    assert httpx.post(url, content=ok, headers={"Content-Type": "application/json"}, timeout=60).status_code == 200
    r = httpx.post(url, json={"model": "m1", "prompt": "[[[[" * 100 + "\\\"{{{{" * 100, "max_tokens": 2}, timeout=60)
    assert r.status_code == 200, r.text  # brackets inside strings are text
    assert "RecursionError" not in d.log() and "Traceback" not in d.log()


def test_slow_clients_time_out(make_daemon):
    d = make_daemon(client_timeout_secs=1.5)
    # Headers trickled a byte at a time: the connection is closed.
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
        t0 = time.monotonic()
        closed = False
        for byte in b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
            try:
                s.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            s.settimeout(0.2)
            try:
                if s.recv(1024) == b"":
                    closed = True
                    break
            except socket.timeout:
                pass
            except ConnectionResetError:
                closed = True
                break
        assert closed and time.monotonic() - t0 < 5
    # A body trickled: 408 in the OpenAI envelope, then the connection is closed.
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"model\"")
        t0 = time.monotonic()
        data = b""
        while b"request_timeout" not in data and (chunk := s.recv(65536)):
            data += chunk
        assert data.startswith(b"HTTP/1.1 408"), data[:200]
        assert b"Connection: close" in data and time.monotonic() - t0 < 5
    assert httpx.get(d.url + "/health").status_code == 200


def test_queue_is_bounded(make_daemon):
    p = free_ports(1)
    d = make_daemon(models={"m1": model_entry("m1", p[0], extra=["--sim-load-seconds", "3"])},
                    policy={"max_queued_requests": 3})

    async def go():
        async with httpx.AsyncClient(timeout=60) as c:
            async def one(i):
                await asyncio.sleep(0.05 * i)  # in order: the first ones queue
                return await c.post(d.url + "/v1/completions", json={"model": "m1", "prompt": f"p{i}", "max_tokens": 2})
            return await asyncio.gather(*(one(i) for i in range(8)))

    rs = asyncio.run(go())
    codes = [r.status_code for r in rs]
    assert codes[:3] == [200, 200, 200] and codes[3:] == [429] * 5, codes
    err = envelope(rs[-1])
    assert err["code"] == "too_many_requests" and err["type"] == "rate_limit_error" and rs[-1].headers["Retry-After"]
    assert d.status()["queue_depth"] == 0
    assert metric(d, "llmuxd_requests_total", model="m1", status="429") == 5
