"""The HTTP surface under attack: non-canonical paths, hop-by-hop headers, API keys, the control
API's authority (loopback, token, admin port, a peer in another network namespace) and what
aiohttp's parser refuses by itself.  Real daemon, real backends (the simulator, or the echo
backend that logs every request it receives), requests sent byte for byte."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from harness import free_ports, raw_http, wait_until

ECHO = f"{sys.executable} {Path(__file__).with_name('echo_backend.py')}"
BODY = b'{"model":"m1","prompt":"hi","max_tokens":2}'
TOKEN = "control-token-for-tests-0123456789"


def echo_models(*names: str) -> dict:
    ports = free_ports(len(names))
    return {n: {"model_path": "echo", "port": p, "eviction": {"weights": "retain", "process": "stop"}}
            for n, p in zip(names, ports)}


@pytest.fixture
def echo_daemon(make_daemon, tmp_path):
    """``echo_daemon(**top_level)``: a daemon whose models (m1, m2) are echo backends; returns
    (daemon, read_log) where read_log() lists what the backends received."""
    log = tmp_path / "echo.jsonl"

    def make(models=("m1", "m2"), env=None, **top):
        d = make_daemon(models=echo_models(*models), vllm_command=ECHO,
                        env={"ECHO_BACKEND_LOG": str(log), **(env or {})}, **top)

        def received() -> list[dict]:
            return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

        return d, received

    return make


def request(method: str, target: str, body: bytes = BODY, headers: dict | None = None) -> bytes:
    """Bytes of one request; the server closes the connection after it (unless ``headers``
    brings its own Connection header, which must then say close)."""
    headers = {"Connection": "close", **(headers or {})}
    head = [f"{method} {target} HTTP/1.1", "Host: llmuxd", "Content-Type: application/json",
            f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def envelope(r) -> dict:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# Each must be refused before routing: aiohttp would normalize it, a backend might too.
NON_CANONICAL = [
    "/v1/../sleep", "/v1/%2e%2e/sleep", "/v1/%2E%2e/collective_rpc", "/v1/%2e%2E/wake_up", "/v1/.%2e/sleep",
    "/v1/./completions", "/v1/%2e/completions", "/v1/completions/..", "/v1/completions/.", "/v1//completions",
    "//v1/completions", "/v1/completions/", "/v1\\..\\sleep", "/v1/%5c../sleep", "/v1/%5C..%5Csleep",
    "/v1/..%2fsleep", "/v1/%2fsleep", "/v1/%2F..%2Fsleep", "/v1/%252e%252e/sleep", "/v1/..;/sleep",
    "/v1/completions;x", "/v1/%00/completions", "/v1/%ff", "/v1/%zz", "/v1/completions%3f",
    "/v1/completions%20", "http://127.0.0.1/sleep", "/v1/../../is_sleeping", "/v1/%2e%2e/reset_prefix_cache",
]


def test_non_canonical_paths_never_reach_the_simulator(make_daemon):
    """The simulator serves /sleep, /wake_up, /collective_rpc ... (dev mode, as llmuxd starts
    it): none is reachable through llmuxd, however the path is spelled."""
    d = make_daemon()
    d.control("wake", "m1")
    backend = f"http://127.0.0.1:{d.config['models']['m1']['port']}"
    for target in NON_CANONICAL:
        for method in ("POST", "GET"):
            r = raw_http(d.port, request(method, target))
            assert r.status == 400, (method, target, r.raw[:300])
            assert envelope(r)["type"] == "invalid_request_error", (target, r.body)
    r = raw_http(d.port, request("POST", "/v1/completions"))  # the canonical path still works
    assert r.status == 200 and r.json()["choices"]
    assert httpx.get(backend + "/is_sleeping").json() == {"is_sleeping": False}
    assert d.status()["models"]["m1"]["state"] == "awake"
    # The simulator's access log: what reached it is llmuxd's health checks, the one canonical
    # request, and the test's own /is_sleeping just now.
    seen = re.findall(r'"([A-Z]+) (\S+) HTTP/1.1"', (Path(d.config["log_dir"]) / "m1.log").read_text())
    assert seen and set(seen) <= {("GET", "/health"), ("POST", "/v1/completions"), ("GET", "/is_sleeping")}, seen
    assert seen.count(("POST", "/v1/completions")) == 1 and seen.count(("GET", "/is_sleeping")) == 1


def test_only_canonical_v1_paths_are_forwarded(echo_daemon):
    d, received = echo_daemon()
    d.control("wake", "m1")
    for target in NON_CANONICAL:
        assert raw_http(d.port, request("POST", target)).status == 400, target
    # Encoded unreserved characters are decoded, and what is forwarded is the canonical form.
    r = raw_http(d.port, request("POST", "/v1/%63ompletions?x=%20y"))
    assert r.status == 200 and r.json()["raw_path"] == "/v1/completions?x=%20y"
    paths = [e["raw_path"] for e in received() if "raw_path" in e]
    assert paths and all(p == "/health" or p.startswith("/v1/completions") for p in paths), paths


def test_hop_by_hop_headers_are_dropped_both_ways(echo_daemon):
    d, received = echo_daemon()
    hop = {"Connection": "close, X-Hop-Secret", "X-Hop-Secret": "dropped", "Keep-Alive": "timeout=5",
           "Proxy-Connection": "keep-alive", "Proxy-Authorization": "Basic c2VjcmV0", "TE": "trailers",
           "Trailer": "X-Checksum", "Upgrade": "h2c", "X-End-To-End": "kept", "Authorization": "Bearer backend-own"}
    target = "/v1/completions"
    r = raw_http(d.port, request("POST", target, headers=hop))
    assert r.status == 200, r.raw[:500]
    got = {k.lower(): v for k, v in r.json()["headers"]}
    for name in ("x-hop-secret", "keep-alive", "proxy-connection", "proxy-authorization", "te", "trailer", "upgrade"):
        assert name not in got, (name, got)
    assert got["x-end-to-end"] == "kept"
    assert got["authorization"] == "Bearer backend-own"  # no api_keys: the header is the backend's
    # Backend -> client: its Connection names X-Backend-Hop, which must not pass either.
    for name in ("x-backend-hop", "keep-alive", "proxy-authenticate", "trailer", "upgrade"):
        assert name not in r.headers, (name, r.headers)
    assert r.headers["x-end-to-end"] == "passes"
    assert [e for e in received() if e.get("raw_path") == target]


def test_api_keys(echo_daemon):
    d, received = echo_daemon(api_keys=["sk-first-key-000000", "sk-second-key-11111"])
    url = d.url + "/v1/completions"
    body = {"model": "m1", "prompt": "hi"}
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": "Basic sk-first-key-000000"},
                    {"Authorization": "Bearer"}, {"Authorization": "sk-first-key-000000"}):
        r = httpx.post(url, json=body, headers=headers)
        assert r.status_code == 401 and envelope(r)["code"] == "invalid_api_key", (headers, r.text)
        assert r.headers["WWW-Authenticate"] == "Bearer"
    assert httpx.get(d.url + "/v1/models").status_code == 401
    assert not [e for e in received() if e.get("raw_path", "").startswith("/v1/")]  # nothing reached a backend
    for key in ("sk-first-key-000000", "sk-second-key-11111"):
        r = httpx.post(url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert r.status_code == 200, r.text
        assert "authorization" not in {k.lower() for k, _ in r.json()["headers"]}  # llmuxd's key stays here
    assert httpx.get(d.url + "/v1/models", headers={"Authorization": "Bearer sk-second-key-11111"}).status_code == 200
    assert httpx.get(d.url + "/health").status_code == 200
    assert httpx.get(d.url + "/control/status").status_code == 200  # loopback control needs no API key
    assert "sk-first-key" not in d.log()


def test_control_token_loopback_rules_and_secrecy(echo_daemon):
    d, _ = echo_daemon(env={"LLMUXD_CONTROL_TOKEN": TOKEN})
    status = d.url + "/control/status"
    assert httpx.get(status).status_code == 200  # loopback, no credentials
    r = httpx.get(status, headers={"Authorization": "Bearer wrong-token-wrong-token"})
    assert r.status_code == 401 and envelope(r)["code"] == "invalid_api_key"  # presented: must be right
    assert httpx.get(status, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    for proxy_header in ("X-Forwarded-For", "Forwarded", "X-Real-IP"):  # came through a local proxy
        r = httpx.get(status, headers={proxy_header: "203.0.113.7"})
        assert r.status_code == 403 and envelope(r)["code"] == "forbidden", proxy_header
    with_token = {"X-Forwarded-For": "1.2.3.4", "Authorization": f"Bearer {TOKEN}"}
    assert httpx.get(status, headers=with_token).status_code == 200
    r = httpx.post(d.url + "/control/wake", json={"model": "m1"}, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and d.status()["models"]["m1"]["state"] == "stopped"
    assert d.control("wake", "m1").status_code == 200
    # The token is in no backend's environment (nor, so, in a checkpoint) and not in the log.
    for pid in d.status()["models"]["m1"]["pids"]:
        assert TOKEN.encode() not in Path(f"/proc/{pid}/environ").read_bytes()
    assert TOKEN not in d.log()
    assert "$LLMUXD_CONTROL_TOKEN" in d.log()  # where it came from is said


def test_control_token_sources(echo_daemon, tmp_path):
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "control-token").write_text("credential-token-abcdefgh\n")
    d, _ = echo_daemon(env={"CREDENTIALS_DIRECTORY": str(creds)}, control_token="config-token-0123456789")
    status = d.url + "/control/status"
    assert httpx.get(status, headers={"Authorization": "Bearer credential-token-abcdefgh"}).status_code == 200
    assert httpx.get(status, headers={"Authorization": "Bearer config-token-0123456789"}).status_code == 401
    d.stop()
    (creds / "control-token").write_text("tiny-7x\n")
    bad, _ = echo_daemon(env={"CREDENTIALS_DIRECTORY": str(creds)}, start=False)
    with pytest.raises(AssertionError, match="exited with 2"):
        bad.start()
    assert "at least 16 characters" in bad.log() and "tiny-7x" not in bad.log()


def test_admin_port_takes_the_control_api(echo_daemon):
    admin = free_ports(1)[0]
    d, _ = echo_daemon(admin_port=admin)
    r = httpx.get(d.url + "/control/status")
    assert r.status_code == 404 and envelope(r)
    assert httpx.post(d.url + "/control/wake", json={"model": "m1"}).status_code == 404
    admin_url = f"http://127.0.0.1:{admin}"
    assert httpx.get(admin_url + "/control/status").json()["active_model"] is None
    assert httpx.post(admin_url + "/control/wake", json={"model": "m1"}, timeout=30).json()["state"] == "awake"
    assert "llmuxd_switches_total" in httpx.get(admin_url + "/metrics").text
    assert httpx.get(admin_url + "/health").json()["active_model"] == "m1"
    assert httpx.get(admin_url + "/v1/models").status_code == 404  # no proxy on the admin port
    assert httpx.get(d.url + "/health").status_code == 200


# -- a peer that is not loopback: a network namespace of our own -----------------------------------

def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=check)


@pytest.fixture
def netns():
    """A network namespace of our own, held by a process (unnamed: nothing in /run/netns), joined
    to the host by a veth pair on a random /30 of TEST-NET-1 (192.0.2.0/24).  Yields a function
    running a command inside it, and the host-side address; everything goes however the test
    ends."""
    tag = f"{os.getpid() % 10000}{random.randrange(1000)}"
    host_if, ns_if = f"lxh{tag}", f"lxn{tag}"
    base = 4 * random.randrange(64)
    host_addr, ns_addr = f"192.0.2.{base + 1}", f"192.0.2.{base + 2}"
    holder = subprocess.Popen(["unshare", "--net", "--", "sleep", "600"], stdin=subprocess.DEVNULL)
    inside = ("nsenter", "-t", str(holder.pid), "-n", "--")
    try:
        ours = os.readlink("/proc/self/ns/net")
        wait_until(lambda: holder.poll() is None and os.readlink(f"/proc/{holder.pid}/ns/net") != ours, 10,
                   what="the namespace")
        _run("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _run("ip", "link", "set", ns_if, "netns", str(holder.pid))
        _run("ip", "addr", "add", f"{host_addr}/30", "dev", host_if)
        _run("ip", "link", "set", host_if, "up")
        _run(*inside, "ip", "addr", "add", f"{ns_addr}/30", "dev", ns_if)
        _run(*inside, "ip", "link", "set", ns_if, "up")
        _run(*inside, "ip", "link", "set", "lo", "up")
        yield (lambda *argv: _run(*inside, *argv, check=False)), host_addr
    finally:
        _run("ip", "link", "del", host_if, check=False)
        holder.kill()
        holder.wait()


def _curl_from(run_inside, url: str, *args: str) -> tuple[int, str]:
    r = run_inside("curl", "-sS", "--max-time", "20", "-o", "-", "-w", "\n%{http_code}", *args, url)
    if r.returncode:
        return -r.returncode, f"{r.args}: {r.stderr}"
    body, _, code = r.stdout.rpartition("\n")
    return int(code), body


def test_control_from_a_non_loopback_peer(echo_daemon, netns):
    inside, host_addr = netns
    admin = free_ports(1)[0]
    d, _ = echo_daemon(host="0.0.0.0", env={"LLMUXD_CONTROL_TOKEN": TOKEN})
    base = f"http://{host_addr}:{d.port}"
    code, body = _curl_from(inside, base + "/health")
    assert code == 200, body  # the peer reaches llmuxd
    code, body = _curl_from(inside, base + "/control/status")
    assert code == 403 and json.loads(body)["error"]["code"] == "forbidden"
    code, body = _curl_from(inside, base + "/control/wake", "-d", '{"model":"m1"}')
    assert code == 403 and d.status()["models"]["m1"]["state"] == "stopped"
    code, _ = _curl_from(inside, base + "/control/status", "-H", "Authorization: Bearer not-the-token-at-all")
    assert code == 401
    code, body = _curl_from(inside, base + "/control/wake", "-H", f"Authorization: Bearer {TOKEN}", "-d", '{"model":"m1"}')
    assert code == 200 and json.loads(body)["state"] == "awake"
    code, _ = _curl_from(inside, base + "/v1/models")
    assert code == 200  # the OpenAI routes stay open (no api_keys)
    d.stop()
    # admin_port on loopback: the peer cannot even connect, and the main port has no /control.
    d2, _ = echo_daemon(host="0.0.0.0", admin_port=admin, env={"LLMUXD_CONTROL_TOKEN": TOKEN})
    base = f"http://{host_addr}:{d2.port}"
    code, body = _curl_from(inside, base + "/control/status", "-H", f"Authorization: Bearer {TOKEN}")
    assert code == 404, body
    code, err = _curl_from(inside, f"http://{host_addr}:{admin}/control/status", "-H", f"Authorization: Bearer {TOKEN}")
    assert code < 0, err  # connection refused
    assert httpx.get(f"http://127.0.0.1:{admin}/control/status").status_code == 200


# -- what aiohttp's parser refuses by itself (request smuggling, malformed framing) --------------

SMUGGLING = {
    "Content-Length with Transfer-Encoding": "Content-Length: 10\r\nTransfer-Encoding: chunked",
    "two Content-Length": "Content-Length: 44\r\nContent-Length: 45",
    "two equal Content-Length": "Content-Length: 44\r\nContent-Length: 44",
    "signed Content-Length": "Content-Length: +44",
    "negative Content-Length": "Content-Length: -1",
    "unknown Transfer-Encoding": "Transfer-Encoding: xchunked",
    "chunked not last": "Transfer-Encoding: chunked, identity",
    "two Transfer-Encoding": "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
    "space before colon": "Transfer-Encoding : chunked",
    "obsolete line folding": "X-A: a\r\n b\r\nContent-Length: 44",
    "NUL in a header": "X-A: a\x00b\r\nContent-Length: 44",
    "bare CR in a header": "X-A: a\rb\r\nContent-Length: 44",
}


def test_ambiguous_framing_is_refused_by_aiohttp(echo_daemon):
    """Documents what aiohttp's parser (llhttp) refuses before llmuxd sees a request: each gets
    aiohttp's own 400 and the connection is closed; nothing reaches a backend, nothing is
    logged as an error."""
    d, received = echo_daemon(models=("m1",))
    chunked = b"2c\r\n" + BODY + b"\r\n0\r\n\r\n"
    for what, headers in SMUGGLING.items():
        raw = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\n{headers}\r\nConnection: close\r\n\r\n".encode()
        r = raw_http(d.port, raw + (chunked if "chunked" in headers else BODY))
        assert r.status == 400, (what, r.raw[:300])
    assert not [e for e in received() if e.get("raw_path", "").startswith("/v1/")]
    assert "Traceback" not in d.log() and " ERROR " not in d.log()
