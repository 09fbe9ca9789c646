"""Benchmark (figures, not a test): what llmuxd's OpenAI proxy costs, against a backend called directly.

Two backends, each started by llmuxd as its ``vllm_command`` (one model, awake), answering a
small JSON completion and an SSE stream: (a) an aiohttp server, (b) a raw asyncio one (a
protocol class, no framework: about as fast as Python serves HTTP).  Against each, measured
side by side in one run, direct (the backend's port) and through llmuxd:

* req/s at concurrency 1 and 32 (keep-alive clients), latency p50/p99 and what llmuxd adds;
  llmuxd's CPU time per request at concurrency 32;
* SSE: time to the first event (concurrency 1), and 1,000 concurrent streams of events every
  ``--sse-interval-ms``: the largest gap between two events of a stream (what llmuxd adds is a
  stall), and the first event's latency under that load.

The load generator is a separate set of processes (a raw asyncio HTTP/1.1 client, several
processes so that it is never the bottleneck), pinned to other CPUs than llmuxd and the backend,
which get one physical core each.  Each ``--tree LABEL=DIR`` is an llmuxd source tree (the
folder holding the ``llmuxd`` package) benchmarked in turn, each with its own backends:

  .venv/bin/python bench/proxy.py                                  # this checkout's llmuxd
  .venv/bin/python bench/proxy.py --tree old=/tmp/old --tree new=.   # before/after, one run

Prints a table (ratios: through llmuxd / direct) and writes bench/results/proxy-<host>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent

# -- the backends ------------------------------------------------------------------------------------

COMPLETION = {"id": "cmpl-bench", "object": "text_completion", "created": 1700000000, "model": "m",
              "choices": [{"index": 0, "text": " the quick brown fox jumps over the lazy dog", "logprobs": None,
                           "finish_reason": "length"}],
              "usage": {"prompt_tokens": 5, "completion_tokens": 10, "total_tokens": 15}}
COMPLETION_BYTES = json.dumps(COMPLETION).encode()
EVENT = b'data: {"id":"cmpl-bench","object":"text_completion","created":1700000000,"model":"m",' \
        b'"choices":[{"index":0,"text":" tok","logprobs":null,"finish_reason":null}]}\n\n'
DONE = b"data: [DONE]\n\n"
_NUM = re.compile(rb'"(max_tokens|interval_ms)"\s*:\s*(\d+)')
_STREAM = re.compile(rb'"stream"\s*:\s*true')


def stream_params(body: bytes) -> tuple[bool, int, float]:
    """(stream?, events, seconds between events) from a request body, without a JSON parser."""
    nums = {k.decode(): int(v) for k, v in _NUM.findall(body)}
    return bool(_STREAM.search(body)), nums.get("max_tokens", 16), nums.get("interval_ms", 0) / 1000


def backend_aiohttp(port: int, host: str) -> None:
    from aiohttp import web

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        stream, n, interval = stream_params(body)
        if not stream:
            return web.Response(body=COMPLETION_BYTES, content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        for i in range(n):
            if i and interval:
                await asyncio.sleep(interval)
            await resp.write(EVENT)
        await resp.write(DONE)
        await resp.write_eof()
        return resp

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/v1/{tail:.*}", completions)
    web.run_app(app, host=host, port=port, print=None, access_log=None, backlog=4096)


class RawBackend(asyncio.Protocol):
    """HTTP/1.1 keep-alive, Content-Length request bodies; JSON with Content-Length, SSE chunked."""

    def connection_made(self, transport) -> None:
        self.t = transport
        self.buf = b""
        self.busy = False

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while not self.busy:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end]
            n = 0
            i = head.lower().find(b"\r\ncontent-length:")
            if i >= 0:
                j = head.find(b"\r\n", i + 2)
                n = int(head[i + 17:j if j > 0 else len(head)])
            if len(self.buf) < end + 4 + n:
                return
            body, self.buf = self.buf[end + 4:end + 4 + n], self.buf[end + 4 + n:]
            line = head[:head.find(b"\r\n")]
            if line.startswith(b"GET /health"):
                self.t.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok")
                continue
            stream, events, interval = stream_params(body)
            if not stream:
                self.t.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(COMPLETION_BYTES), COMPLETION_BYTES))
                continue
            self.busy = True
            self.t.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            self._events(events, interval)

    def _events(self, left: int, interval: float) -> None:
        if self.t.is_closing():
            return
        chunk = b"%x\r\n%s\r\n" % (len(EVENT), EVENT)
        if not interval:
            self.t.write(chunk * left + b"%x\r\n%s\r\n0\r\n\r\n" % (len(DONE), DONE))
            self.busy = False
            return
        self.t.write(chunk)
        if left > 1:
            asyncio.get_running_loop().call_later(interval, self._events, left - 1, interval)
        else:
            self.t.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(DONE), DONE))
            self.busy = False
            if self.buf:
                self.data_received(b"")

    def eof_received(self) -> bool:
        return False


def backend_raw(port: int, host: str) -> None:
    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(RawBackend, host, port, backlog=4096, reuse_address=True)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        async with server:
            await stop.wait()

    asyncio.run(serve())


# -- the load generator --------------------------------------------------------------------------------

class Client(asyncio.Protocol):
    """One keep-alive connection; one request at a time; Content-Length or chunked responses."""

    def __init__(self, loop) -> None:
        self.loop = loop
        self.fut = None
        self.on_event = None

    def connection_made(self, transport) -> None:
        self.t = transport

    def send(self, req: bytes, on_event=None) -> asyncio.Future:
        self.buf = b""
        self.need = None
        self.status = 0
        self.on_event = on_event
        self.fut = self.loop.create_future()
        self.t.write(req)
        return self.fut

    def data_received(self, d: bytes) -> None:
        buf = self.buf + d if self.buf else d
        if self.need is None:
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                self.buf = buf
                return
            head = buf[:i]
            self.status = int(head[9:12])
            j = head.lower().find(b"\r\ncontent-length:")
            if j >= 0:
                k = head.find(b"\r\n", j + 2)
                self.need = i + 4 + int(head[j + 17:k if k > 0 else None])
            else:
                self.need = -1
            d = buf[i + 4:]
        if self.on_event is not None and d:
            n = d.count(b"data: ")
            if n:
                self.on_event(n)
        if (self.need >= 0 and len(buf) >= self.need) or (self.need < 0 and buf.endswith(b"\r\n0\r\n\r\n")):
            self.buf = b""
            if not self.fut.done():
                self.fut.set_result(self.status)
        else:
            self.buf = buf if self.need >= 0 else buf[-16:]  # chunked: only its end is looked for

    def connection_lost(self, exc) -> None:
        if self.fut is not None and not self.fut.done():
            self.fut.set_exception(ConnectionError(f"connection lost: {exc}"))


def request_bytes(body: dict) -> bytes:
    raw = json.dumps(body).encode()
    return (b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(raw), raw))


async def _connect(loop, port: int) -> Client:
    _, c = await loop.create_connection(lambda: Client(loop), "127.0.0.1", port)
    return c


async def load_rate(port: int, conns: int, warmup: float, duration: float, start_at: float) -> dict:
    loop = asyncio.get_running_loop()
    req = request_bytes({"model": "m", "prompt": "benchmark", "max_tokens": 10})
    clients = [await _connect(loop, port) for _ in range(conns)]
    await asyncio.sleep(max(0.0, start_at - time.time()))
    t_measure = time.perf_counter() + warmup
    t_end = t_measure + duration
    lat: list[float] = []
    errors = 0

    async def run(c: Client) -> None:
        nonlocal errors
        while True:
            t0 = time.perf_counter()
            status = await c.send(req)
            t1 = time.perf_counter()
            if status != 200:
                errors += 1
            if t1 > t_end:
                return
            if t0 >= t_measure:
                lat.append(t1 - t0)

    await asyncio.gather(*(run(c) for c in clients))
    return {"count": len(lat), "secs": duration, "lat_us": [round(x * 1e6, 1) for x in lat], "errors": errors}


async def load_sse_first(port: int, duration: float, events: int) -> dict:
    loop = asyncio.get_running_loop()
    req = request_bytes({"model": "m", "prompt": "benchmark", "max_tokens": events, "stream": True})
    c = await _connect(loop, port)
    first: list[float] = []
    end = time.perf_counter() + duration
    for _ in range(50):  # warm up
        await c.send(req)
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        seen: list[float] = []
        status = await c.send(req, lambda n: seen.append(time.perf_counter()) if not seen else None)
        if status == 200 and seen:
            first.append(seen[0] - t0)
    return {"first_us": [round(x * 1e6, 1) for x in first]}


async def load_sse_many(port: int, streams: int, events: int, interval_ms: int, start_at: float) -> dict:
    loop = asyncio.get_running_loop()
    req = request_bytes({"model": "m", "prompt": "benchmark", "max_tokens": events, "interval_ms": interval_ms,
                         "stream": True})
    clients = []
    for _ in range(streams):
        clients.append(await _connect(loop, port))
    await asyncio.sleep(max(0.0, start_at - time.time()))
    gaps: list[float] = []
    firsts: list[float] = []
    counts: list[int] = []
    arrivals: list[list[float]] = []  # per stream: when events came (perf_counter: one clock for all processes)
    errors = 0

    async def run(c: Client) -> None:
        nonlocal errors
        times: list[float] = []
        n = [0]

        def on_event(k: int) -> None:
            times.append(time.perf_counter())
            n[0] += k

        t0 = time.perf_counter()
        try:
            status = await c.send(req, on_event)
        except ConnectionError:
            errors += 1
            return
        if status != 200 or not times:
            errors += 1
            return
        firsts.append(times[0] - t0)
        gaps.append(max((b - a for a, b in zip(times, times[1:])), default=0.0))
        counts.append(n[0])
        arrivals.append([round(t * 1e3, 3) for t in times])

    await asyncio.gather(*(run(c) for c in clients))
    return {"gap_ms": [round(g * 1e3, 3) for g in gaps], "first_ms": [round(f * 1e3, 3) for f in firsts],
            "events": counts, "errors": errors, "arrivals_ms": arrivals}


def load_main(argv: list[str]) -> None:
    kind, port = argv[0], int(argv[1])
    a = [float(x) for x in argv[2:]]
    if kind == "rate":
        out = asyncio.run(load_rate(port, int(a[0]), a[1], a[2], a[3]))
    elif kind == "sse-first":
        out = asyncio.run(load_sse_first(port, a[0], int(a[1])))
    else:
        out = asyncio.run(load_sse_many(port, int(a[0]), int(a[1]), int(a[2]), a[3]))
    sys.stdout.write(json.dumps(out))


# -- the harness ---------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_layout() -> tuple[int, int, list[int]]:
    """(llmuxd's CPU, the backend's CPU, the load generator's CPUs): llmuxd and the backend each
    on a physical core of their own (no SMT sibling busy), the load on all the rest."""
    cpus = sorted(os.sched_getaffinity(0))
    groups: list[list[int]] = []
    seen: set[int] = set()
    for c in cpus:
        if c in seen:
            continue
        try:
            sib = Path(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list").read_text().strip()
            members = set()
            for part in sib.split(","):
                lo, _, hi = part.partition("-")
                members.update(range(int(lo), int(hi or lo) + 1))
        except OSError:
            members = {c}
        members &= set(cpus)
        groups.append(sorted(members))
        seen |= members
    if len(groups) < 3:
        raise SystemExit(f"need at least 3 physical cores, have {len(groups)}")
    # CPU 0 takes most interrupts: leave it to the load generator.
    mine = [g for g in groups if 0 not in g]
    llmuxd, backend = mine[0], mine[1]
    load = [c for c in cpus if c not in llmuxd and c not in backend]
    return llmuxd[0], backend[0], load


def pinned(cpus, argv: list[str]) -> list[str]:
    return ["taskset", "-c", ",".join(map(str, cpus)) if isinstance(cpus, list) else str(cpus), *argv]


def http_get(url: str, timeout: float = 2) -> int:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status


def wait_http(url: str, proc: subprocess.Popen | None, secs: float = 60) -> None:
    deadline = time.monotonic() + secs
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}")
        try:
            if http_get(url) == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {secs} s")


def cpu_secs(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


class Daemon:
    def __init__(self, label: str, tree: Path, backend: str, work: Path, cpus: tuple[int, int, list[int]],
                 profile: Path | None = None):
        self.work = work / f"{label}-{backend}"
        self.work.mkdir(parents=True)
        llmuxd_cpu, backend_cpu, _ = cpus
        self.port, self.backend_port = free_port(), free_port()
        vllm = " ".join(pinned(backend_cpu, [sys.executable, str(HERE), "backend", backend]))
        config = {
            "models": {"m": {"model_path": "bench", "port": self.backend_port,
                             "eviction": {"weights": "retain", "process": "stop"}}},
            "port": self.port, "metrics_port": 0, "host": "127.0.0.1", "vllm_command": vllm, "log_dir": str(self.work / "logs"),
            "policy": {"request_timeout_secs": 60, "min_active_secs": 0, "startup_timeout_secs": 60},
            "isolation": {"pid_namespace": False, "block_io_uring": False, "own_tmpdir": False},
        }
        (self.work / "config.json").write_text(json.dumps(config))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), *filter(None, [os.environ.get("PYTHONPATH")])]))
        prof = ["-m", "cProfile", "-o", str(profile)] if profile else []
        argv = pinned(llmuxd_cpu, [sys.executable, *prof, "-m", "llmuxd", "serve", "--config",
                                   str(self.work / "config.json"), "--dbus", "off"])
        self.log = open(self.work / "llmuxd.log", "wb")
        self.proc = subprocess.Popen(argv, env=env, stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL,
                                     start_new_session=True, cwd=self.work)
        self.url = f"http://127.0.0.1:{self.port}"
        try:
            wait_http(self.url + "/health", self.proc)
            req = urllib.request.Request(self.url + "/control/wake", data=b'{"model": "m"}', method="POST",
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                assert json.loads(r.read())["state"] == "awake"
            wait_http(f"http://127.0.0.1:{self.backend_port}/health", None)
        except BaseException:
            self.stop()
            print((self.work / "llmuxd.log").read_text()[-3000:], file=sys.stderr)
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def run_load(load_cpus: list[int], workers: int, kind: str, port: int, per_worker) -> list[dict]:
    """``per_worker(i)``: the numeric arguments of worker ``i``."""
    procs = []
    for i in range(workers):
        cpu = load_cpus[i % len(load_cpus)]
        procs.append(subprocess.Popen(pinned(cpu, [sys.executable, str(HERE), "load", kind, str(port),
                                                   *map(str, per_worker(i))]),
                                      stdout=subprocess.PIPE, stdin=subprocess.DEVNULL))
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=300)
        if p.returncode:
            raise RuntimeError(f"load generator {kind} failed ({p.returncode})")
        outs.append(json.loads(out))
    return outs


def rate(cpus, port: int, conns: int, warmup: float, secs: float, pid: int | None = None) -> dict:
    load = cpus[2]
    workers = min(conns, len(load), 8)
    split = [conns // workers + (1 if i < conns % workers else 0) for i in range(workers)]
    start_at = time.time() + 0.4 + 0.05 * workers
    before = cpu_secs(pid) if pid else None
    outs = run_load(load, workers, "rate", port, lambda i: (split[i], warmup, secs, start_at))
    cpu = cpu_secs(pid) - before if pid else None
    lat = [x for o in outs for x in o["lat_us"]]
    count = sum(o["count"] for o in outs)
    res = {"rps": count / secs, "p50_us": pct(lat, 50), "p99_us": pct(lat, 99), "errors": sum(o["errors"] for o in outs),
           "requests": count}
    if cpu is not None:  # over warmup + measured window, and the idle gaps: an upper bound per request
        total = count * (warmup + secs) / secs
        res["llmuxd_cpu_us_per_req"] = cpu / total * 1e6 if total else float("nan")
    return res


def sse_first(cpus, port: int, secs: float) -> dict:
    out = run_load(cpus[2], 1, "sse-first", port, lambda i: (secs, 4))[0]
    return {"p50_us": pct(out["first_us"], 50), "p99_us": pct(out["first_us"], 99), "n": len(out["first_us"])}


def sse_many(cpus, port: int, streams: int, events: int, interval_ms: int) -> dict:
    load = cpus[2]
    workers = min(len(load), 8)
    split = [streams // workers + (1 if i < streams % workers else 0) for i in range(workers)]
    start_at = time.time() + 1.0 + streams / 2000
    outs = run_load(load, workers, "sse-many", port, lambda i: (split[i], events, interval_ms, start_at))
    gaps = [g for o in outs for g in o["gap_ms"]]
    firsts = [f for o in outs for f in o["first_ms"]]
    events_seen = [e for o in outs for e in o["events"]]
    arrivals = [a for o in outs for a in o["arrivals_ms"]]
    # Once every stream has had its first event (the burst of 1,000 starts is over): the relay alone.
    all_started = max((a[0] for a in arrivals if a), default=0.0)
    steady = [max((b - a for a, b in zip(t, t[1:]) if a >= all_started), default=0.0) for t in arrivals]
    return {"streams_ok": len(gaps), "errors": sum(o["errors"] for o in outs),
            "gap_max_ms": max(gaps, default=float("nan")), "gap_p99_ms": pct(gaps, 99), "gap_p50_ms": pct(gaps, 50),
            "steady_gap_max_ms": max(steady, default=float("nan")), "steady_gap_p99_ms": pct(steady, 99),
            "first_p50_ms": pct(firsts, 50), "first_max_ms": max(firsts, default=float("nan")),
            "events_min": min(events_seen, default=0)}


def bench_one(label: str, tree: Path, backend: str, work: Path, cpus, args) -> dict:
    d = Daemon(label, tree, backend, work, cpus)
    pid = d.proc.pid
    s = args.scale
    try:
        r = {}
        r["c1_direct"] = rate(cpus, d.backend_port, 1, 0.3 * s, 1.2 * s)
        r["c1_proxy"] = rate(cpus, d.port, 1, 0.3 * s, 1.2 * s, pid)
        r["c32_direct"] = rate(cpus, d.backend_port, 32, 0.5 * s, 2.0 * s)
        r["c32_proxy"] = rate(cpus, d.port, 32, 0.5 * s, 2.0 * s, pid)
        r["sse_first_direct"] = sse_first(cpus, d.backend_port, 0.8 * s)
        r["sse_first_proxy"] = sse_first(cpus, d.port, 0.8 * s)
        n, ev, iv = args.streams, args.sse_events, args.sse_interval_ms
        r["sse_many_direct"] = sse_many(cpus, d.backend_port, n, ev, iv)
        r["sse_many_proxy"] = sse_many(cpus, d.port, n, ev, iv)
        r["streams"] = n
        r["llmuxd_log_errors"] = sum(1 for line in (d.work / "llmuxd.log").read_text(errors="replace").splitlines()
                                     if " ERROR " in line or "Traceback" in line)
    finally:
        d.stop()
    return r


def profile_one(tree: Path, backend: str, work: Path, cpus, out: Path) -> str:
    """llmuxd under cProfile during a concurrency-32 run: the top of its own time."""
    import pstats
    import io

    prof = work / "llmuxd.prof"
    d = Daemon("profile", tree, backend, work, cpus, profile=prof)
    try:
        rate(cpus, d.port, 32, 0.3, 2.0)
    finally:
        d.stop()
    s = io.StringIO()
    pstats.Stats(str(prof), stream=s).strip_dirs().sort_stats("tottime").print_stats(30)
    text = s.getvalue()
    (out / "proxy-profile.txt").write_text(text)
    return text


def derived(r: dict) -> dict:
    return {
        "c1_ratio": r["c1_proxy"]["rps"] / r["c1_direct"]["rps"],
        "c32_ratio": r["c32_proxy"]["rps"] / r["c32_direct"]["rps"],
        "added_p50_ms": (r["c1_proxy"]["p50_us"] - r["c1_direct"]["p50_us"]) / 1000,
        "added_p99_ms": (r["c1_proxy"]["p99_us"] - r["c1_direct"]["p99_us"]) / 1000,
        "sse_first_added_ms": (r["sse_first_proxy"]["p50_us"] - r["sse_first_direct"]["p50_us"]) / 1000,
        "sse_many_gap_added_ms": r["sse_many_proxy"]["gap_max_ms"] - r["sse_many_direct"]["gap_max_ms"],
        "sse_many_steady_gap_added_ms": (r["sse_many_proxy"]["steady_gap_max_ms"]
                                         - r["sse_many_direct"]["steady_gap_max_ms"]),
    }


def table(results: dict) -> str:
    rows = []
    head = (f"{'tree':<8} {'backend':<8} {'c1 req/s d/p':>15} {'ratio':>6} {'c32 req/s d/p':>17} {'ratio':>6} "
            f"{'cpu/req':>8} {'p50 +ms':>8} {'p99 +ms':>8} {'sse1st +ms':>10} {'1k max gap ms d/p':>17} "
            f"{'steady d/p':>13} {'1k 1st p50 ms d/p':>18} {'err':>4}")
    rows.append(head)
    rows.append("-" * len(head))
    for label, per in results.items():
        for backend, r in per.items():
            x = derived(r)
            sd, sp = r["sse_many_direct"], r["sse_many_proxy"]
            err = (r["c1_proxy"]["errors"] + r["c32_proxy"]["errors"] + sp["errors"] + r["llmuxd_log_errors"]
                   + r["streams"] - sp["streams_ok"])
            rows.append(
                f"{label:<8} {backend:<8} {r['c1_direct']['rps']:>7.0f}/{r['c1_proxy']['rps']:<7.0f} "
                f"{x['c1_ratio']:>6.2f} {r['c32_direct']['rps']:>8.0f}/{r['c32_proxy']['rps']:<8.0f} "
                f"{x['c32_ratio']:>6.2f} {r['c32_proxy'].get('llmuxd_cpu_us_per_req', float('nan')):>6.0f}us "
                f"{x['added_p50_ms']:>8.3f} {x['added_p99_ms']:>8.3f} {x['sse_first_added_ms']:>10.3f} "
                f"{sd['gap_max_ms']:>8.1f}/{sp['gap_max_ms']:<8.1f} "
                f"{sd['steady_gap_max_ms']:>6.1f}/{sp['steady_gap_max_ms']:<6.1f} "
                f"{sd['first_p50_ms']:>8.2f}/{sp['first_p50_ms']:<9.2f} {err:>4}")
    return "\n".join(rows)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "backend":
        ap = argparse.ArgumentParser()
        ap.add_argument("kind", choices=["aiohttp", "raw"])
        ap.add_argument("--port", type=int, required=True)
        ap.add_argument("--host", default="127.0.0.1")
        args, _ = ap.parse_known_args(sys.argv[2:])
        (backend_aiohttp if args.kind == "aiohttp" else backend_raw)(args.port, args.host)
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "load":
        load_main(sys.argv[2:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tree", action="append", default=[], metavar="LABEL=DIR",
                    help="an llmuxd source tree to benchmark (default: this checkout)")
    ap.add_argument("--backend", action="append", choices=["aiohttp", "raw"], default=[])
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--sse-events", type=int, default=30)
    ap.add_argument("--sse-interval-ms", type=int, default=50)
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies every measuring time")
    ap.add_argument("--profile", metavar="LABEL", help="also profile this tree's llmuxd (cProfile, aiohttp backend)")
    ap.add_argument("--host-label", default=platform.node().split(".")[0] or "host")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()
    trees = dict(t.split("=", 1) for t in args.tree) or {"this": str(REPO)}
    backends = args.backend or ["aiohttp", "raw"]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # 1,000 streams: 2,000+ sockets in llmuxd
    cpus = cpu_layout()
    os.sched_setaffinity(0, cpus[2])
    info = {"host": args.host_label, "python": sys.version.split()[0], "cpus": os.cpu_count(),
            "llmuxd_cpu": cpus[0], "backend_cpu": cpus[1], "load_cpus": cpus[2],
            "cpu_model": next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                               if line.startswith("model name")), "?")}
    try:
        import aiohttp

        info["aiohttp"] = aiohttp.__version__
    except ImportError:
        pass
    print(json.dumps(info), flush=True)
    work = Path(tempfile.mkdtemp(prefix="llmuxd-bench-proxy-"))
    results: dict = {}
    try:
        for backend in backends:
            for label, tree in trees.items():
                t = time.monotonic()
                results.setdefault(label, {})[backend] = bench_one(label, Path(tree).resolve(), backend, work, cpus,
                                                                   args)
                print(f"{label} / {backend}: {time.monotonic() - t:.1f} s", flush=True)
        results = {label: {b: results[label][b] for b in backends} for label in trees}
        print(table(results), flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        doc = {"info": info, "params": {"streams": args.streams, "sse_events": args.sse_events,
                                        "sse_interval_ms": args.sse_interval_ms, "scale": args.scale},
               "derived": {label: {b: derived(r) for b, r in per.items()} for label, per in results.items()},
               "results": results, "table": table(results)}
        path = args.out / f"proxy-{args.host_label}.json"
        path.write_text(json.dumps(doc, indent=1))
        print(f"written: {path}")
        if args.profile:
            print(profile_one(Path(trees[args.profile]).resolve(), "aiohttp", work, cpus, args.out)[:6000])
    except BaseException:
        print(f"work folder kept: {work}", file=sys.stderr)
        raise
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
