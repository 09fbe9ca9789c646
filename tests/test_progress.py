"""A transition's progress, as a user sees it: the phase, step, elapsed and typical times in
/control/status and D-Bus-free HTTP, the live event stream (/control/events), `llmuxd wake` on a
pipe and on a terminal, and SSE keep-alives for streaming clients waiting for a cold start.

A cold start is held in its ``load`` step for as long as a test wants: the model's command is a
wrapper that waits while a hold file exists, then runs the simulator — each window is reached
for certain, not by timing."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import socket
import subprocess
import threading
from pathlib import Path

import httpx
import openai
import pytest

from conftest import model_entry
from harness import LLMUXD, SIM, dechunk, free_ports, wait_until
from test_switching import metric
from llmuxd.api.stream import MAX_STREAMS


class Holds:
    """``vllm_command`` for a daemon whose model starts can be held: while ``hold(model_path)``
    is in place, the model's server does not start (its cold start stays in ``load``)."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir()
        self.command = folder / "vllm"
        self.command.write_text(
            "#!/bin/sh\n"
            f'hold="{folder}/hold-$(echo "$2" | tr / _)"; i=0\n'
            'while [ -e "$hold" ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done\n'
            f'exec {SIM} "$@"\n')
        self.command.chmod(0o755)

    def _file(self, model: str) -> Path:
        return self.folder / ("hold-" + model_entry(model, 1)["model_path"].replace("/", "_"))

    def hold(self, model: str) -> None:
        self._file(model).touch()

    def release(self, model: str) -> None:
        self._file(model).unlink(missing_ok=True)


@pytest.fixture
def holds(tmp_path) -> Holds:
    return Holds(tmp_path / "holds")


def progress(d, model: str) -> dict | None:
    return d.status()["models"][model]["progress"]


def in_load(d, model: str) -> dict | None:
    p = progress(d, model)
    return p if p and (p["phase"], p["kind"], p["step"]) == ("wake", "cold_start", "load") else None


def label(p: dict) -> str:
    """A phase as people are shown it: a wake by its kind."""
    return p["kind"] if p["phase"] == "wake" else p["phase"]


class Events:
    """``GET /control/events`` read in a thread (HTTP/1.0 on a raw socket: the body is the
    stream itself): the events, the frames, and the comment lines."""

    def __init__(self, url: str, headers: dict[str, str] | None = None):
        self.events: list[dict] = []
        self.frames: list[tuple[str, dict]] = []  # (the frame's `event:` field, its data)
        self.comments: list[str] = []
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.sock.sendall(f"GET /control/events HTTP/1.0\r\nHost: x\r\n{extra}\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data and (chunk := self.sock.recv(65536)):
            data += chunk
        head, _, self._rest = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.0 200 ") or b"text/event-stream" not in head.lower():
            self.sock.close()
            raise AssertionError(f"/control/events answered: {data!r}")
        self.sock.settimeout(None)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        kind, data, buf = None, None, self._rest
        try:
            while True:
                while b"\n" in buf:
                    raw, _, buf = buf.partition(b"\n")
                    line = raw.decode()
                    if line.startswith(":"):
                        self.comments.append(line)
                    elif line.startswith("event: "):
                        kind = line[7:]
                    elif line.startswith("data: "):
                        data = json.loads(line[6:])
                    elif not line and data is not None:
                        self.frames.append((kind, data))
                        self.events.append(data)
                        kind, data = None, None
                chunk = self.sock.recv(65536)
                if not chunk:
                    return
                buf += chunk
        except OSError:
            pass

    def ended(self) -> bool:
        return not self._thread.is_alive()

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._thread.join(10)
        self.sock.close()

    def of(self, model: str) -> list[tuple[str, str, str | None]]:
        return [(e["event"], label(e["progress"]), e["progress"]["step"]) for e in self.events if e["model"] == model]


# -- /control/status and /control/events -----------------------------------------------------------
def test_status_shows_the_phase_step_and_elapsed_time_of_a_cold_start(make_daemon, holds):
    p = free_ports(2)
    d = make_daemon(models={"m1": model_entry("m1", p[0], "retain", "stop"), "m2": model_entry("m2", p[1])},
                    vllm_command=str(holds.command))
    st = d.status()
    assert st["event_seq"] == 0 and all(m["progress"] is None for m in st["models"].values())
    holds.hold("m1")
    wake = threading.Thread(target=d.control, args=("wake", "m1"))
    wake.start()
    try:
        first = wait_until(lambda: in_load(d, "m1"), 30, what="m1's cold start in its load step")
        assert first["typical_secs"] is None and first["step_typical_secs"] is None  # none before the first
        assert d.status()["models"]["m1"]["state"] == "starting"
        later = wait_until(lambda: (q := in_load(d, "m1")) and q["elapsed_secs"] > first["elapsed_secs"] and q,
                           30, what="the cold start's elapsed time to grow")
        assert later["step_elapsed_secs"] > first["step_elapsed_secs"]
        assert later["elapsed_secs"] >= later["step_elapsed_secs"]
        r = subprocess.run([LLMUXD, "status", "--url", d.url], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert re.search(r"^m1 cold_start: load, [\d.]+ s so far$", r.stdout, re.M), r.stdout
    finally:
        holds.release("m1")
        wake.join(60)
    st = d.status()
    assert st["models"]["m1"]["state"] == "awake" and st["models"]["m1"]["progress"] is None
    first_start = st["models"]["m1"]["last_wake_secs"]
    # m1 is evicted by `stop`: its next wake is a cold start again, now with a typical duration.
    assert d.control("wake", "m2").status_code == 200
    holds.hold("m1")
    wake = threading.Thread(target=d.control, args=("wake", "m1"))
    wake.start()
    try:
        second = wait_until(lambda: in_load(d, "m1"), 30, what="m1's second cold start")
        assert second["typical_secs"] == pytest.approx(first_start, abs=0.05)
        assert second["step_typical_secs"] is not None and 0 < second["step_typical_secs"] <= second["typical_secs"]
    finally:
        holds.release("m1")
        wake.join(60)
    assert metric(d, "llmuxd_switch_phase_seconds_count", phase="wake", kind="cold_start") == 3
    assert metric(d, "llmuxd_switch_phase_seconds_count", phase="sleep") == 2


def test_event_stream_tells_every_phase_and_step_in_order(make_daemon):
    d = make_daemon()
    ev = Events(d.url)
    try:
        assert d.control("wake", "m1").status_code == 200
        assert d.control("wake", "m2").status_code == 200  # m1: offload + keep_running
        assert d.control("wake", "m1").status_code == 200  # a wake of a tree kept running
        seq = d.status()["event_seq"]
        wait_until(lambda: ev.events and ev.events[-1]["seq"] == seq, 10, what="every event in the stream")
    finally:
        ev.close()
    assert [e["seq"] for e in ev.events] == list(range(1, seq + 1))
    assert all(kind == e["event"] for kind, e in ev.frames)
    assert ev.of("m1") == [
        ("phase_started", "cold_start", None), ("step", "cold_start", "spawn"), ("step", "cold_start", "load"),
        ("phase_done", "cold_start", None),
        ("phase_started", "drain", None), ("phase_done", "drain", None),
        ("phase_started", "sleep", None), ("step", "sleep", "weights"), ("phase_done", "sleep", None),
        ("phase_started", "wake", None), ("step", "wake", "wake_sequence"), ("phase_done", "wake", None),
    ]
    done = [e for e in ev.events if e["event"] == "phase_done" and e["model"] == "m1"]
    assert done[0]["progress"]["elapsed_secs"] > 0 and done[0]["progress"]["typical_secs"] is not None
    st = d.status()["models"]["m1"]
    assert done[-1]["progress"]["elapsed_secs"] == pytest.approx(st["last_wake_secs"], abs=0.05)


def test_a_stream_opened_mid_transition_starts_with_where_it_is(make_daemon, holds):
    d = make_daemon(vllm_command=str(holds.command))
    holds.hold("m1")
    wake = threading.Thread(target=d.control, args=("wake", "m1"))
    wake.start()
    ev = None
    try:
        wait_until(lambda: in_load(d, "m1"), 30, what="m1 held in its load step")
        ev = Events(d.url)
        wait_until(lambda: ev.events, 10, what="the first event")
        first = ev.events[0]
        assert first["event"] == "in_progress" and first["model"] == "m1"
        assert label(first["progress"]) == "cold_start" and first["progress"]["step"] == "load"
    finally:
        holds.release("m1")
        wake.join(60)
        if ev is not None:
            wait_until(lambda: ("phase_done", "cold_start", None) in ev.of("m1"), 10, what="the cold start's end")
            ev.close()


def test_event_streams_end_when_llmuxd_stops(make_daemon):
    d = make_daemon()
    ev = Events(d.url)
    d.stop()
    wait_until(ev.ended, 20, what="the stream's end")
    assert ": closed: llmuxd is stopping" in ev.comments
    ev.close()


def test_the_event_stream_is_for_control_callers_and_bounded(make_daemon):
    token = "the-control-token-0123456789"
    d = make_daemon(env={"LLMUXD_CONTROL_TOKEN": token})
    url = d.url + "/control/events"
    r = httpx.get(url, headers={"X-Forwarded-For": "203.0.113.7"})  # came through a proxy: no loopback trust
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    r = httpx.get(url, headers={"Authorization": "Bearer not-the-token-at-all"})
    assert r.status_code == 401
    streams = [Events(d.url) for _ in range(MAX_STREAMS)]
    try:
        r = httpx.get(url)
        assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_requests"
        streams.pop().close()  # a reader that leaves frees its place

        def opens() -> bool:
            try:
                streams.append(Events(d.url))
                return True
            except AssertionError:  # 429 until llmuxd has seen the reader go
                return False

        wait_until(opens, 30, what="a new stream once one closed")
    finally:
        for ev in streams:
            ev.close()


# -- llmuxd wake ----------------------------------------------------------------------------------
def test_wake_without_a_terminal_prints_timestamped_phase_lines(make_daemon):
    d = make_daemon()
    wake = lambda m: subprocess.run([LLMUXD, "wake", m, "--url", d.url], capture_output=True, text=True,  # noqa: E731
                                    timeout=120, stdin=subprocess.DEVNULL)
    r = wake("m1")
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(r"m1: awake \([\d.]+ s\)\n", r.stdout), r.stdout  # stdout: the result alone
    lines = r.stderr.splitlines()
    assert all(re.match(r"\d\d:\d\d:\d\d\.\d{3} ", line) for line in lines), r.stderr
    assert [line[13:] for line in lines[:3]] == ["m1 cold_start", "m1 cold_start: spawn", "m1 cold_start: load"]
    assert re.fullmatch(r"m1 cold_start done in [\d.]+ s", lines[3][13:]) and len(lines) == 4, r.stderr
    r = wake("m2")
    assert r.returncode == 0, r.stderr
    said = [line[13:] for line in r.stderr.splitlines()]
    assert said[0] == "m1 drain" and said[1].startswith("m1 drain done in "), said
    assert said[2] == "m1 sleep" and said[3] == "m1 sleep: weights" and said[4].startswith("m1 sleep done in")
    assert said[5:8] == ["m2 cold_start", "m2 cold_start: spawn", "m2 cold_start: load"]
    assert said[8].startswith("m2 cold_start done in") and len(said) == 9, said
    r = wake("m1")  # a tree kept running: a wake
    said = [line[13:] for line in r.stderr.splitlines()]
    assert said[2:4] == ["m2 sleep", "m2 sleep: weights"] and said[5:7] == ["m1 wake", "m1 wake: wake_sequence"], said
    r = wake("m2")  # m1 evicted a second time: now with its typical durations
    said = [line[13:] for line in r.stderr.splitlines()]
    assert re.fullmatch(r"m1 sleep \(typical [\d.]+ s\)", said[2]), said
    assert re.fullmatch(r"m1 sleep: weights \(typical [\d.]+ s\)", said[3]), said
    r = subprocess.run([LLMUXD, "wake", "ghost", "--url", d.url], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "does not exist" in r.stderr


def test_wake_on_a_terminal_redraws_one_line(make_daemon, holds):
    d = make_daemon(vllm_command=str(holds.command))
    holds.hold("m1")
    master, slave = pty.openpty()
    proc = subprocess.Popen([LLMUXD, "wake", "m1", "--url", d.url], stdin=slave, stdout=slave, stderr=slave,
                            close_fds=True)
    os.close(slave)
    out = b""

    def read_until(predicate, what: str) -> None:
        def more():
            nonlocal out
            if select.select([master], [], [], 0.1)[0]:
                try:
                    out += os.read(master, 65536)
                except OSError:  # the command ended and closed the terminal
                    return True
            return predicate(out)

        wait_until(more, 60, interval=0, what=what)

    try:
        live = rb"\r\x1b\[Km1 cold_start: load ([\d.]+) s"
        read_until(lambda o: len(set(re.findall(live, o))) >= 2, "the live line redrawn with a later time")
        drawn = [float(x) for x in re.findall(live, out)]
        assert drawn == sorted(drawn), drawn  # the elapsed time goes on
        holds.release("m1")
        read_until(lambda o: b"m1: awake" in o, "the command's result")
        assert proc.wait(30) == 0
    finally:
        holds.release("m1")
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    text = out.decode()
    assert re.search(r"\r\x1b\[Km1 cold_start done in [\d.]+ s\r?\n", text), repr(text)
    assert not re.search(r"\d\d:\d\d:\d\d\.\d{3}", text)  # no timestamped lines on a terminal
    assert re.search(r"\nm1: awake \([\d.]+ s\)\r?\n$", text), repr(text)  # the live line cleared first


# -- keep-alives for streaming clients ------------------------------------------------------------
def stream_request(model: str, prompt: str = "hi", max_tokens: int = 4, **extra) -> bytes:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
                       "temperature": 0, **extra}).encode()
    return (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class RawStream:
    """A streaming request on a raw socket, read as it arrives."""

    def __init__(self, port: int, request: bytes):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock.sendall(request)
        self.data = b""

    def read_until(self, predicate, what: str) -> bytes:
        def more():
            if predicate(self.data):
                return True
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError(f"the connection closed before {what}: {self.data!r}")
            self.data += chunk
            return predicate(self.data)

        wait_until(more, 60, interval=0, what=what)
        return self.data

    def rest(self) -> bytes:
        while chunk := self.sock.recv(65536):
            self.data += chunk
        self.sock.close()
        return self.data


def keepalive_daemon(make_daemon, holds, **policy):
    return make_daemon(vllm_command=str(holds.command), policy={"sse_keepalive_secs": 0.2, **policy})


def test_a_streaming_client_gets_comments_while_its_model_cold_starts(make_daemon, holds, expected):
    d = keepalive_daemon(make_daemon, holds)
    holds.hold("m1")
    raw = RawStream(d.port, stream_request("m1", "slow start"))
    plain: list[httpx.Response] = []  # a request without "stream": gets no keep-alives
    t = threading.Thread(target=lambda: plain.append(httpx.post(
        d.url + "/v1/completions", json={"model": "m1", "prompt": "plain", "max_tokens": 3}, timeout=60)))
    try:
        comment = rb": waiting for m1 \(cold_start: (spawn|load), (\d+) s\)\n\n"
        raw.read_until(lambda b: len(re.findall(comment, b)) >= 3, "three keep-alive comments")
        t.start()
        head, _, body = raw.data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head.lower(), head
        assert b"data:" not in body  # nothing but comments so far
        wait_until(lambda: d.status()["models"]["m1"]["waiting"] == 2, 30, what="the plain request waiting too")
    finally:
        holds.release("m1")
    stream = dechunk(raw.rest().partition(b"\r\n\r\n")[2])
    frames = [f for f in stream.split(b"\n\n") if f.startswith(b"data: ")]
    assert frames[-1] == b"data: [DONE]"
    text = "".join(json.loads(f[6:])["choices"][0]["text"] for f in frames[:-1])
    assert text == expected("m1", "slow start", 4)
    t.join(60)
    assert plain[0].status_code == 200 and plain[0].headers["content-type"].startswith("application/json")
    assert plain[0].json()["choices"][0]["text"] == expected("m1", "plain", 3)


def test_the_openai_client_parses_a_stream_that_began_with_keep_alives(make_daemon, holds, expected):
    d = keepalive_daemon(make_daemon, holds)
    holds.hold("m2")
    texts: list[str] = []
    errors: list[BaseException] = []

    def client():
        try:
            api = openai.OpenAI(base_url=d.url + "/v1", api_key="x", max_retries=0, timeout=120)
            stream = api.completions.create(model="m2", prompt="openai", max_tokens=5, stream=True, temperature=0)
            texts.append("".join(c.choices[0].text for c in stream))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=client)
    t.start()
    try:
        wait_until(lambda: d.status()["models"]["m2"]["waiting"] == 1, 30, what="the openai request waiting")
        # A raw request queued after it: once it has had two comments, so has the earlier one
        # (the same period, started earlier, on one event loop).
        raw = RawStream(d.port, stream_request("m2"))
        raw.read_until(lambda b: b.count(b": waiting for m2") >= 2, "keep-alives")
    finally:
        holds.release("m2")
    t.join(60)
    raw.rest()
    assert not errors and texts == [expected("m2", "openai", 5)], errors


def test_a_wait_that_fails_after_keep_alives_ends_the_stream_in_openai_shape(make_daemon, holds):
    p = free_ports(1)
    d = make_daemon(models={"m1": model_entry("m1", p[0])}, vllm_command=str(holds.command),
                    policy={"sse_keepalive_secs": 0.2, "request_timeout_secs": 1.5})
    holds.hold("m1")
    try:
        # The wait ends with the queue timeout: the status line went out, the error is a frame.
        raw = RawStream(d.port, stream_request("m1"))
        body = dechunk(raw.rest().partition(b"\r\n\r\n")[2])
        assert raw.data.startswith(b"HTTP/1.1 200") and b": waiting for m1" in body
        err = json.loads(body.rstrip(b"\n").rsplit(b"\n\n", 1)[-1].removeprefix(b"data: "))
        assert err["error"]["code"] == "queue_timeout" and "timed out after 1.5 s" in err["error"]["message"]
        assert metric(d, "llmuxd_requests_total", model="m1", status="504") == 1
    finally:
        holds.release("m1")
    wait_until(lambda: d.status()["models"]["m1"]["state"] == "awake", 30, what="m1 awake")


def test_a_backend_error_after_keep_alives_ends_the_stream_in_openai_shape(make_daemon, holds):
    d = keepalive_daemon(make_daemon, holds)
    holds.hold("m1")
    try:
        # The backend refuses the request (400) after keep-alives: its own error, in the stream,
        # and the official client raises it.
        api = openai.OpenAI(base_url=d.url + "/v1", api_key="x", max_retries=0, timeout=60)
        # It returns once the status line and headers arrived: sent while m1 is held, before
        # the backend said anything.
        stream = api.completions.create(model="m1", prompt="x", max_tokens=0, stream=True)
        assert in_load(d, "m1")
        holds.release("m1")
        with pytest.raises(openai.APIError) as e:
            list(stream)
        assert "max_tokens must be a positive integer" in str(e.value.message)
        assert e.value.body["code"] == 400 and e.value.body["type"] == "BadRequestError"
    finally:
        holds.release("m1")
    assert metric(d, "llmuxd_requests_total", model="m1", status="400") == 1
