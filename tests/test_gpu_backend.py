"""The GPU test backend (tests/gpu/backend.py) on CPU tensors.

The GPU itself cannot run here (no CUDA on this machine): these tests exercise the backend's
HTTP endpoints, its vLLM-shaped process tree, greedy decoding from the safetensors weights in the
HF cache, and the sleep/wake/reload semantics, with the engine's tensors on the CPU.  The GPU
path (CUDA memory really freed by sleep level 2, CUDA graph, CUDA suspend, CRIU checkpoint and
restore in a new mount namespace) is exercised by tests/gpu/run.sh on the GPU machine; its figures are
in bench/results/gpu-h200.{json,md}.

Needs torch (skipped without it; a CPU wheel is enough).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

torch = pytest.importorskip("torch")

from harness import REPO, LlmuxdProcess, free_ports, terminate, wait_until  # noqa: E402

from gpu import model as gm  # noqa: E402

PROMPT = "llmuxd canary: the capital of France is"
REPO_ID = "gpu-test/tiny"


def env_for(hf: Path, home: Path) -> dict[str, str]:
    env = dict(os.environ)
    # the checkout's llmuxd, and tests/ for the backend's package (`python -m gpu.backend`)
    path = [str(REPO), str(REPO / "tests"), *(p for p in sys.path if p and "torch" in p and Path(p, "torch").is_dir())]
    env.update(HF_HOME=str(hf), HF_HUB_OFFLINE="1", HOME=str(home), VLLM_SERVER_DEV_MODE="1",
               PYTHONPATH=os.pathsep.join(path + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return env


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    base = tmp_path_factory.mktemp("gpu-backend")
    hf = base / "hf"
    m = gm.make_model(REPO_ID, hf, hidden=64, layers=2, vocab=512, window=64, kv_bytes=1 << 20, seed=3)
    (base / "home").mkdir()
    return base, hf, m


def reference(snapshot: Path, prompt: str, max_tokens: int) -> str:
    """Greedy answer computed in this process (eager, CPU) from the weights file."""
    d = gm.Dims.from_config(json.loads((snapshot / "config.json").read_text()))
    lm = gm.TinyLM(d, torch.device("cpu"))
    lm.alloc_weights()
    lm.alloc_kv()
    gm.load_into(snapshot / "model.safetensors", lm.weights)
    ids = gm.encode(prompt, d.vocab)
    tok, pos = torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)

    def step(t: int, p: int) -> int:
        tok.fill_(t)
        pos.fill_(p)
        return int(lm.step(tok, pos).item())

    nxt = 0
    for p, t in enumerate(ids):
        nxt = step(t, p)
    out, p = [], len(ids)
    for i in range(max_tokens):
        out.append(gm.decode_token(nxt))
        if i < max_tokens - 1:
            nxt = step(nxt, p)
            p += 1
    return "".join(out)


class Server:
    def __init__(self, base: Path, hf: Path, *extra: str):
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = base / f"backend-{self.port}.log"
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gpu.backend", "serve", REPO_ID, "--port", str(self.port),
                 "--served-model-name", "tiny", *extra],
                env=env_for(hf, base / "home"), stdout=f, stderr=f, stdin=subprocess.DEVNULL, cwd=REPO,
                start_new_session=True)

        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"backend exited {self.proc.returncode}: {self.log.read_text()}")
            try:
                return httpx.get(self.url + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, 60, what="backend /health")

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=60)

    def post(self, path: str, body: dict | None = None) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=60)

    def complete(self, prompt: str = PROMPT, max_tokens: int = 8) -> str:
        r = self.post("/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens,
                                          "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    def info(self, checksum: bool = False) -> dict:
        r = self.get("/gpu/info" + ("?checksum=1" if checksum else ""))
        assert r.status_code == 200, r.text
        return r.json()

    def stop(self) -> None:
        terminate(self.proc, 20, group=True)  # the API server and its engine


@pytest.fixture(scope="module")
def server(made):
    base, hf, _ = made
    s = Server(base, hf, "--enable-sleep-mode", "--max-model-len", "64")  # an unknown vLLM flag: ignored
    yield s
    s.stop()


def test_model_in_hf_cache_layout(made):
    _, hf, m = made
    repo = hf / "hub" / "models--gpu-test--tiny"
    commit = (repo / "refs" / "main").read_text()
    assert m.snapshot == repo / "snapshots" / commit
    for name in ("config.json", "model.safetensors"):
        link = m.snapshot / name
        assert link.is_symlink() and link.resolve().parent == (repo / "blobs").resolve()
    start, header = gm.read_header(m.snapshot / "model.safetensors")
    assert start % 8 == 0 and header["__metadata__"]["format"] == "pt"
    d = gm.Dims.from_config(json.loads((m.snapshot / "config.json").read_text()))
    assert list(header["embed.weight"]["shape"]) == [512, 64] and header["embed.weight"]["dtype"] == "BF16"
    end = max(e["data_offsets"][1] for k, e in header.items() if k != "__metadata__")
    assert (m.snapshot / "model.safetensors").stat().st_size == start + end == start + m.weights_bytes
    assert d.kv_bytes == m.kv_bytes >= 1 << 20


def test_plain_endpoints_and_greedy_answer(server, made):
    _, _, m = made
    assert server.get("/health").status_code == 200
    models = server.get("/v1/models").json()
    assert [x["id"] for x in models["data"]] == ["tiny"]
    want = reference(m.snapshot, PROMPT, 8)
    assert server.complete() == want == server.complete()  # deterministic, from the weights
    assert len(set(want.split())) > 1  # not a degenerate repetition
    assert server.complete("another prompt entirely", 8) != want
    r = server.post("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                             "max_tokens": 4})
    assert r.status_code == 200 and len(r.json()["choices"][0]["message"]["content"].split()) == 4
    r = server.post("/v1/embeddings", {"model": "tiny", "input": ["a b", "c"]})
    assert r.status_code == 200 and len(r.json()["data"]) == 2 and len(r.json()["data"][0]["embedding"]) == 64
    assert server.post("/v1/completions", {"model": "nope", "prompt": "x"}).status_code == 404
    # streamed: the same tokens
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "stream": True}) as r:
        frames = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    assert "".join(json.loads(f)["choices"][0]["text"] for f in frames[:-1]) == want


def test_process_tree_is_vllm_shaped(server):
    info = server.info()
    assert info["api_pid"] == server.proc.pid and info["engine_pid"] != info["api_pid"]
    ppid = int(Path(f"/proc/{info['engine_pid']}/stat").read_text().rsplit(")", 1)[1].split()[1])
    assert ppid == server.proc.pid
    assert info["device"] == "cpu" and info["graph"] is False  # CUDA graphs only on a GPU
    # the API server never imports torch (only the engine holds tensors)
    maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
    assert "libtorch" not in maps
    assert "libtorch" in Path(f"/proc/{info['engine_pid']}/maps").read_text()


def test_sleep_level2_frees_and_reload_restores(server, made):
    _, _, m = made
    want = server.complete()
    before = server.info(checksum=True)
    assert before["weights_bytes"] == m.weights_bytes and before["kv_bytes"] == m.kv_bytes
    assert server.get("/is_sleeping").json() == {"is_sleeping": False}
    assert server.post("/sleep?level=2").status_code == 200
    assert server.get("/is_sleeping").json() == {"is_sleeping": True}
    asleep = server.info()
    assert asleep["weights_bytes"] == 0 and asleep["kv_bytes"] == 0 and asleep["graph"] is False
    assert server.get("/health").status_code == 200  # asleep is healthy, as in vLLM
    # reload while the weights are asleep is refused
    assert server.post("/collective_rpc", {"method": "reload_weights"}).status_code == 400
    assert server.post("/wake_up").status_code == 200
    woke = server.info()
    assert woke["weights_bytes"] == m.weights_bytes and woke["kv_bytes"] == m.kv_bytes
    r = server.post("/collective_rpc", {"method": "reload_weights"})
    assert r.status_code == 200 and r.json() == {"results": [None]}
    assert server.post("/reset_prefix_cache").status_code == 200
    after = server.info(checksum=True)
    assert after["checksum"] == before["checksum"]
    assert server.complete() == want
    assert {"sleep_level2", "wake_up", "reload_weights"} <= set(after["timings"])


def test_sleep_level1_offloads_and_wakes_without_reload(server):
    want = server.complete()
    before = server.info(checksum=True)["checksum"]
    assert server.post("/sleep?level=1").status_code == 200
    assert server.info()["weights_bytes"] == 0
    assert server.post("/wake_up").status_code == 200
    assert server.info(checksum=True)["checksum"] == before
    assert server.complete() == want


def test_bad_rpc_and_sleep_level(server):
    assert server.post("/collective_rpc", {"method": "nope"}).status_code == 400
    assert server.post("/sleep?level=3").status_code == 400


def test_sleep_needs_enable_sleep_mode(made):
    base, hf, _ = made
    s = Server(base, hf)
    try:
        assert s.post("/sleep?level=1").status_code == 400
        assert s.complete()
    finally:
        s.stop()


@pytest.mark.slow
def test_llmuxd_drives_it_as_vllm_command(made, tmp_path):
    """llmuxd (entrypoint mode) cold-starts it, evicts it with discard (sleep level 2), wakes it
    with wake_up -> reload_weights -> reset_prefix_cache; the answer stays the same."""
    base, hf, m = made
    port, mport = free_ports(2)
    config = {"models": {"tiny": {"model_path": REPO_ID, "port": mport,
                                  "eviction": {"weights": "discard", "process": "keep_running"}}},
              "port": port, "metrics_port": 0, "host": "127.0.0.1", "vllm_command": f"{sys.executable} -m gpu.backend",
              "log_dir": str(tmp_path / "logs"),
              "policy": {"request_timeout_secs": 60, "min_active_secs": 0, "startup_timeout_secs": 60}}
    d = LlmuxdProcess(tmp_path, config, env_for(hf, base / "home"))
    d.start()
    try:
        want = reference(m.snapshot, PROMPT, 8)
        url = d.url
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 8}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want
        assert d.control("sleep", "tiny").json()["state"] == "asleep"
        info = httpx.get(f"http://127.0.0.1:{mport}/gpu/info", timeout=10).json()
        assert info["weights_bytes"] == 0 and info["kv_bytes"] == 0
        assert d.control("wake", "tiny").json()["state"] == "awake"
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 8}, timeout=60)
        assert r.json()["choices"][0]["text"] == want
        info = httpx.get(f"http://127.0.0.1:{mport}/gpu/info", timeout=10).json()
        assert "reload_weights" in info["timings"]
    finally:
        assert d.stop() == 0
        assert d.leftovers == []
