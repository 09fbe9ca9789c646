"""The vLLM simulator (llmuxd-vllm-sim): real processes on real loopback ports."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmuxd.isolation.procfs import alive
from llmuxd.sim import gpu
from llmuxd.sim.model import make_model

_SCRIPT = Path(sys.executable).parent / "llmuxd-vllm-sim"
SIM = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "llmuxd.sim.server"]
MiB = 1 << 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            out += [int(x) for x in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    except OSError:
        pass
    return out


class Sim:
    """One started simulator (API server process)."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc, self.port, self.log_path = proc, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(base_url=self.url, timeout=10, trust_env=False)
        self.info: dict[str, Any] = {}
        self.known_pids: set[int] = {proc.pid}

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def wait_up(self, timeout: float = 15) -> Sim:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.known_pids.update(_children(self.proc.pid))
            if self.proc.poll() is not None:
                raise AssertionError(f"simulator exited {self.proc.returncode}:\n{self.log}")
            try:
                r = self.http.get("/sim/info", timeout=1)
                if r.status_code == 200:
                    self.info.update(r.json())
                    self.known_pids.add(self.info["engine_pid"])
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"simulator did not come up:\n{self.log}")

    def wait_exit(self, timeout: float = 10) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.known_pids.update(_children(self.proc.pid))
            if self.proc.poll() is not None:
                return self.proc.returncode
            time.sleep(0.02)
        raise AssertionError(f"simulator still running after {timeout}s:\n{self.log}")

    def chat(self, text: str, model: str | None = None, max_tokens: int = 8) -> str:
        r = self.http.post("/v1/chat/completions", json={
            "model": model or self.info.get("served", "org/a"),
            "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    def kill(self) -> None:
        """Stop this simulator's processes (by pid): SIGTERM, then SIGKILL; drop its leftovers."""
        self.http.close()
        self.known_pids.update(_children(self.proc.pid))
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                pass
        for pid in sorted(self.known_pids - {self.proc.pid}):
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        leftovers = list(self.info.get("ipc_paths", []))
        if self.info.get("shm_name"):
            leftovers.append(f"/dev/shm/{self.info['shm_name']}")
        for path in leftovers:
            Path(path).unlink(missing_ok=True)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    e = dict(os.environ)
    e.update(HF_HOME=str(tmp_path / "hf"), HOME=str(tmp_path / "home"),
             LLMUXD_SIM_GPU_DIR=str(tmp_path / "gpu"), LLMUXD_SIM_GPU_BYTES=str(1 << 30),
             VLLM_SERVER_DEV_MODE="1", HF_HUB_OFFLINE="1")
    e.pop("LLMUXD_SIM_CPU_LIKE", None)
    make_model("org/a", 1, e["HF_HOME"], gpu_bytes=100 * MiB)
    make_model("org/b", 2, e["HF_HOME"], gpu_bytes=100 * MiB)
    return e


@pytest.fixture
def start(env: dict[str, str], tmp_path: Path):
    started: list[Sim] = []

    def _start(model: str = "org/a", *args: str, wait: bool = True, **env_over: str) -> Sim:
        port = _free_port()
        log = tmp_path / f"sim-{len(started)}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [*SIM, "serve", model, "--port", str(port), "--sim-load-seconds", "0.05",
                 "--max-model-len", "256", *args],
                env={**env, **env_over}, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT)
        sim = Sim(proc, port, log)
        sim.info["served"] = model
        started.append(sim)
        return sim.wait_up() if wait else sim

    yield _start
    for sim in started:
        sim.kill()


def _net_unix_inodes(path: str) -> set[str]:
    inodes = set()
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 8 and parts[7] == path:
            inodes.add(parts[6])
    return inodes


def _fd_targets(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return out


def test_process_tree_shape(start, env):
    sim = start("org/a")
    api, engine = sim.proc.pid, sim.info["engine_pid"]
    assert engine in _children(api)
    # Two ZMQ ipc sockets in /tmp, bound (listening) by the API server, not by the engine.
    assert len(sim.info["ipc_paths"]) == 2
    api_fds, engine_fds = _fd_targets(api), _fd_targets(engine)
    for path in sim.info["ipc_paths"]:
        assert path.startswith("/tmp/") and Path(path).is_socket()
        inodes = _net_unix_inodes(path)
        assert inodes and any(f"socket:[{i}]" in api_fds for i in inodes)
        assert not any(f"socket:[{i}]" in engine_fds for i in inodes)
    # Shared-memory status block, mapped by both processes.
    shm = f"/dev/shm/{sim.info['shm_name']}"
    assert sim.info["shm_name"].startswith("psm_") and Path(shm).exists()
    for pid in (api, engine):
        assert shm in Path(f"/proc/{pid}/maps").read_text()
    # Compile-cache-like file under HOME, open and mmapped by the engine.
    cache = sim.info["cache_file"]
    assert cache.startswith(env["HOME"] + "/.cache/llmuxd-sim/")
    assert cache in Path(f"/proc/{engine}/maps").read_text() and cache in engine_fds
    # GPU lease held by the engine pid; nothing in the GPU dir kept open.
    use = gpu.usage(env["LLMUXD_SIM_GPU_DIR"])
    assert [(x["pid"], x["bytes"], x["model"]) for x in use["leases"]] == [(engine, 100 * MiB, "org/a")]
    assert not any(t.startswith(env["LLMUXD_SIM_GPU_DIR"]) for t in engine_fds + api_fds)
    # Weights are not kept open either (read into memory at load).
    assert not any(t.startswith(env["HF_HOME"]) for t in engine_fds)
    assert sim.http.get("/health").status_code == 200
    assert [m["id"] for m in sim.http.get("/v1/models").json()["data"]] == ["org/a"]
    # A second start reuses the cache file.
    sim2 = start("org/a")
    assert sim2.info["cache_file"] == cache
    assert "Using cached kernels" in sim2.log


def test_outputs_deterministic_and_model_dependent(start, env):
    import openai

    a = start("org/a", "--served-model-name", "alpha", "a2")
    b = start("org/b", VLLM_SERVER_DEV_MODE="0")
    a.info["served"] = "alpha"
    assert [m["id"] for m in a.http.get("/v1/models").json()["data"]] == ["alpha", "a2"]
    assert a.chat("hello") == a.chat("hello") == a.chat("hello", model="a2")
    assert a.chat("hello") != a.chat("bye")
    assert a.chat("hello") != b.chat("hello")
    assert len(a.chat("hello", max_tokens=5).split()) == 5

    client = openai.OpenAI(base_url=a.url + "/v1", api_key="x", http_client=httpx.Client(trust_env=False))
    resp = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hello"}],
                                          max_tokens=8)
    assert resp.choices[0].message.content == a.chat("hello")
    assert resp.usage.completion_tokens == 8 and resp.usage.prompt_tokens > 0
    chunks = list(client.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "hello"}], max_tokens=8, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == a.chat("hello")
    assert chunks[-1].choices[0].finish_reason == "length"

    comp = client.completions.create(model="alpha", prompt="Once upon", max_tokens=6)
    assert comp.choices[0].text and comp.usage.completion_tokens == 6
    with a.http.stream("POST", "/v1/completions", json={
            "model": "alpha", "prompt": "Once upon", "max_tokens": 6, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        frames = [line for line in r.iter_lines() if line]
    assert frames[-1] == "data: [DONE]" and len(frames) == 7
    assert "".join(json.loads(f[6:])["choices"][0]["text"] for f in frames[:-1]) == comp.choices[0].text

    e1 = client.embeddings.create(model="alpha", input=["x", "y"]).data
    e2 = client.embeddings.create(model="alpha", input="x").data
    assert e1[0].embedding == e2[0].embedding != e1[1].embedding
    eb = b.http.post("/v1/embeddings", json={"model": "org/b", "input": "x"}).json()["data"][0]
    assert eb["embedding"] != e1[0].embedding

    err = a.http.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    assert err.status_code == 404 and set(err.json()["error"]) == {"message", "type", "param", "code"}
    err = a.http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert err.status_code == 400 and err.json()["error"]["code"] == 400
    # Dev endpoints: present in dev mode (sleep refused without --enable-sleep-mode), absent otherwise.
    r = a.http.post("/sleep", params={"level": "1"})
    assert r.status_code == 400 and "enable-sleep-mode" in r.json()["error"]["message"]
    assert a.http.get("/is_sleeping").json() == {"is_sleeping": False}
    assert b.http.post("/sleep", params={"level": "1"}).status_code == 404
    assert b.http.get("/is_sleeping").status_code == 404


def test_sleep_levels_and_reload(start, env):
    sim = start("org/a", "--enable-sleep-mode")
    engine = sim.info["engine_pid"]
    gdir = env["LLMUXD_SIM_GPU_DIR"]
    good = sim.chat("hello")

    assert sim.http.post("/sleep", params={"level": "1"}).status_code == 200
    assert sim.http.get("/is_sleeping").json() == {"is_sleeping": True}
    assert gpu.usage(gdir)["used"] == 0
    assert sim.http.get("/health").status_code == 200
    # A request while asleep waits for the wake-up instead of failing.
    got: list[str] = []
    t = threading.Thread(target=lambda: got.append(sim.chat("hello")))
    t.start()
    time.sleep(0.4)
    assert t.is_alive() and not got
    assert sim.http.post("/wake_up").status_code == 200
    t.join(10)
    assert got == [good]
    assert sim.http.get("/is_sleeping").json() == {"is_sleeping": False}
    assert [x["pid"] for x in gpu.usage(gdir)["leases"]] == [engine]

    # Level 2: weights discarded; waking without reload gives (deterministic) garbage.
    assert sim.http.post("/sleep", params={"level": "2"}).status_code == 200
    assert gpu.usage(gdir)["used"] == 0
    assert sim.http.post("/wake_up", params={"tags": "weights"}).status_code == 200
    assert sim.http.get("/is_sleeping").json() == {"is_sleeping": True}
    assert sim.http.post("/wake_up", params={"tags": "kv_cache"}).status_code == 200
    assert sim.http.get("/is_sleeping").json() == {"is_sleeping": False}
    garbage = sim.chat("hello")
    assert garbage != good and sim.chat("hello") == garbage
    r = sim.http.post("/collective_rpc", json={"method": "reload_weights"})
    assert r.status_code == 200 and r.json() == {"results": [None]}
    assert sim.chat("hello") == good
    assert sim.http.post("/reset_prefix_cache").status_code == 200
    assert sim.http.post("/sleep", params={"level": "3"}).status_code == 400


def test_gpu_budget(start, env):
    gdir, budget = env["LLMUXD_SIM_GPU_DIR"], 1000 * MiB
    over = {"LLMUXD_SIM_GPU_BYTES": str(budget), "LLMUXD_SIM_CPU_LIKE": "1"}
    a = start("org/a", "--sim-model-bytes", str(600 * MiB), **over)
    b = start("org/b", "--sim-model-bytes", str(600 * MiB), wait=False, **over)
    assert b.wait_exit() != 0
    assert "CUDA out of memory" in b.log
    assert gpu.usage(gdir)["used"] == 600 * MiB

    assert a.http.post("/sleep", params={"level": "1"}).status_code == 200  # CPU-like: allowed
    assert gpu.usage(gdir)["leases"] == []
    b = start("org/b", "--sim-model-bytes", str(600 * MiB), **over)
    assert gpu.usage(gdir)["used"] == 600 * MiB
    r = a.http.post("/wake_up")
    assert r.status_code == 500 and "out of memory" in r.json()["error"]["message"]
    assert a.http.get("/is_sleeping").json() == {"is_sleeping": True}
    assert gpu.usage(gdir)["used"] <= budget
    b.proc.send_signal(signal.SIGTERM)
    assert b.wait_exit() == 0
    assert a.http.post("/wake_up").status_code == 200
    assert a.chat("hi")
    assert [x["pid"] for x in gpu.usage(gdir)["leases"]] == [a.info["engine_pid"]]


def test_engine_crash_mid_stream(start, env):
    sim = start("org/a", "--sim-crash-after-tokens", "5")
    engine = sim.info["engine_pid"]
    texts = []
    with pytest.raises(httpx.TransportError):
        with sim.http.stream("POST", "/v1/completions", json={
                "model": "org/a", "prompt": "x", "max_tokens": 50, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    texts.append(json.loads(line[6:])["choices"][0]["text"])
                assert line != "data: [DONE]"
    t0 = time.monotonic()
    assert sim.wait_exit() == 1
    assert time.monotonic() - t0 < 1.5
    assert 0 < len(texts) <= 5
    assert "died unexpectedly" in sim.log
    assert not alive(engine)
    assert gpu.usage(env["LLMUXD_SIM_GPU_DIR"])["leases"] == []
    assert not any(Path(p).exists() for p in sim.info["ipc_paths"])


def test_sigterm_cleanup_and_flags(start, env):
    sim = start("org/a", "--sim-never-healthy", "--sim-fail-sleep", "--enable-sleep-mode",
                "--some-future-vllm-flag", "--tensor-parallel-size", "1")
    assert sim.http.get("/health").status_code == 503
    assert sim.chat("hi")
    assert sim.http.post("/sleep", params={"level": "1"}).status_code == 500
    engine, paths = sim.info["engine_pid"], sim.info["ipc_paths"]
    shm = Path("/dev/shm") / sim.info["shm_name"]
    assert shm.exists() and all(Path(p).exists() for p in paths)
    sim.proc.send_signal(signal.SIGTERM)
    assert sim.wait_exit(5) == 0
    assert not alive(engine)
    assert not shm.exists() and not any(Path(p).exists() for p in paths)
    assert gpu.usage(env["LLMUXD_SIM_GPU_DIR"])["leases"] == []

    bad = start("org/missing", wait=False)
    assert bad.wait_exit(10) == 1
    assert "org/missing" in bad.log


def test_corrupt_kernel_cache_crashes_engine(start, env):
    """A right-sized stand-in with wrong bytes (as after a bad restore) kills the engine."""
    sim = start("org/a")
    cache = Path(sim.info["cache_file"])
    with open(cache, "r+b") as f:  # in place: the engine's shared mapping sees it
        f.write(bytes(cache.stat().st_size))
    r = sim.http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert r.status_code == 500
    assert sim.wait_exit() == 1
    assert "cached kernel" in sim.log
