"""The cross-container restore test: a checkpoint made in container A restores in a NEW container
B of the same image that shares only the checkpoint folder and the HuggingFace cache.

Two container shapes:
  (a) booted systemd-nspawn containers: own PID namespace, systemd as PID 1, llmuxd.service with
      the restore unit before it;
  (b) mount-namespace containers sharing the host's PID, network and IPC namespaces, as
      ``docker run --pid=host --network=host --ipc=host`` does, with llmuxd as the entrypoint
      (packaging/entrypoint.sh).
Each container's writable layer is fresh: nothing A wrote is visible in B except through the two
shared folders.  The config is the documented checkpoint set-up (Qwen/Qwen3-0.6B with discard +
checkpoint, images under /tmp/llmux-checkpoints), with the simulator as vllm_command and free
ports (3000 and 8001 may be taken on a test machine).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import httpx
import pytest

from harness import free_ports, remove_cgroups
from llmuxd.sim import model as simmodel
from systemd_env import VENV, ServiceContainer, require_containers

sys.path.insert(0, str(Path(__file__).resolve().parent / "infra"))
import entrypoint  # noqa: E402
import mntns  # noqa: E402

pytestmark = [pytest.mark.criu, pytest.mark.slow]

CKPT = entrypoint.CKPT
HF = entrypoint.HF
CHAT = [{"role": "user", "content": "What is CRIU?"}]


def cross_container_config(port: int, model_port: int) -> dict:
    return {
        "models": {"qwen3-0.6b": {"model_path": "Qwen/Qwen3-0.6B", "port": model_port,
                                  "eviction": {"weights": "discard", "process": "checkpoint"},
                                  "checkpoint_path": "/tmp/llmux-checkpoints/qwen3-0.6b/images"}},
        "checkpoint": {"criu_path": "/usr/local/bin/criu", "cuda_plugin_dir": "/usr/lib/criu/",
                       "images_dir": "/tmp/llmux-checkpoints", "cuda_checkpoint_path": "/usr/local/bin/cuda-checkpoint",
                       "keep_images": True},
        "port": port,
        "metrics_port": 0,
        "vllm_command": f"{VENV}/bin/llmuxd-vllm-sim",
        "host": "127.0.0.1",
    }


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The two shared folders: checkpoints (empty) and an HF cache holding Qwen/Qwen3-0.6B (simulated)."""
    base = tmp_path_factory.mktemp("shared")
    hf = base / "hf"
    made = simmodel.make_model("Qwen/Qwen3-0.6B", 7, hf)
    digest = simmodel.weights_digest(simmodel.read_weights(Path(made.snapshot)))
    answer = "".join(simmodel.generate(digest, simmodel.render_chat(CHAT), 12))
    return base, hf, answer


def chat(url: str) -> str:
    r = httpx.post(url + "/v1/chat/completions", json={"model": "qwen3-0.6b", "messages": CHAT, "max_tokens": 12},
                   timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def status(url: str) -> dict:
    return httpx.get(url + "/control/status", timeout=30).json()["models"]["qwen3-0.6b"]


# -- shape (b): mount-namespace containers, llmuxd as the entrypoint ------------------------------

class EntrypointContainer(entrypoint.EntrypointContainer):
    """llmuxd as the container's entrypoint (tests/infra/entrypoint.py) with the checkout's venv;
    stop() also removes what is left of the daemon's cgroup layout (llmuxd-<port>): a daemon
    killed at the container's end cannot."""

    def __init__(self, name: str, ckpt: Path, hf: Path, config: dict, workdir: Path, env: dict | None = None):
        super().__init__(name, ckpt, hf, config, workdir, env, venv=VENV)

    def stop(self, timeout: float = 120) -> None:
        super().stop(timeout)
        remove_cgroups(self.port)


def test_cross_container_entrypoint_shape(tmp_path, shared):
    require_mntns()
    base, hf, answer = shared
    ckpt = base / "ckpt-b"
    ckpt.mkdir()
    port, mport = free_ports(2)
    config = cross_container_config(port, mport)
    a = EntrypointContainer("llmuxd-xa", ckpt, hf, config, tmp_path).start()
    try:
        t0 = time.monotonic()
        assert chat(a.url) == answer  # cold start
        cold = time.monotonic() - t0
        assert status(a.url)["last_wake_kind"] == "cold_start"
        r = httpx.post(a.url + "/control/sleep", json={"model": "qwen3-0.6b"}, timeout=120).json()
        assert r["state"] == "checkpointed", (r, a.log()[-3000:])
        assert (ckpt / "qwen3-0.6b" / "images" / "manifest.json").exists()
        saved = json.loads((ckpt / "qwen3-0.6b" / "images" / "manifest.json").read_text())["saved"]
        assert any(s["path"].startswith("/dev/shm/psm_") for s in saved), saved
        assert any("/.cache/llmuxd-sim/" in s["path"] for s in saved), saved
    finally:
        a.stop()
    for gen, name in enumerate(("llmuxd-xb", "llmuxd-xc")):  # A -> B -> C
        b = EntrypointContainer(name, ckpt, hf, config, tmp_path).start()
        try:
            # B's layer was fresh: the entrypoint's prepare-restore had to put A's run-time files back.
            assert "restored /root/.cache/llmuxd-sim/" in b.log() and "restored /dev/shm/psm_" in b.log()
            assert status(b.url)["state"] == "checkpointed"
            t0 = time.monotonic()
            r = httpx.post(b.url + "/control/wake", json={"model": "qwen3-0.6b"}, timeout=120).json()
            wake = time.monotonic() - t0
            assert r["state"] == "awake", (r, b.log()[-3000:])
            st = status(b.url)
            assert st["last_wake_kind"] == "restore", (st, b.log()[-3000:])
            assert "restored from /tmp/llmux-checkpoints/qwen3-0.6b/images" in b.log()
            assert chat(b.url) == answer
            print(f"{name}: cold start {cold:.2f} s in A, restore+wake {wake:.2f} s: {st['last_restore']['seconds']}")
            assert httpx.post(b.url + "/control/sleep", json={"model": "qwen3-0.6b"},
                              timeout=120).json()["state"] == "checkpointed"
        finally:
            b.stop()


def require_mntns() -> None:
    ok, why = mntns.available()
    if not ok:
        pytest.fail(f"mount-namespace containers not available: {why}")


# -- shape (a): booted systemd containers ----------------------------------------------------------

def test_cross_container_systemd_shape(tmp_path, shared):
    require_containers()
    base, hf, answer = shared
    ckpt = base / "ckpt-a"
    ckpt.mkdir()
    port, mport = free_ports(2)
    config = cross_container_config(port, mport)
    binds = [(str(ckpt), CKPT), (str(hf), HF)]
    a = ServiceContainer("xa", tmp_path, config, {}, binds=binds).start()
    try:
        a.c.systemctl("start", "llmuxd", check=True)
        assert chat(a.url) == answer
        r = httpx.post(a.url + "/control/sleep", json={"model": "qwen3-0.6b"}, timeout=120).json()
        assert r["state"] == "checkpointed", (r, a.c.journal("llmuxd")[-3000:])
    finally:
        a.stop()
    b = ServiceContainer("xb", tmp_path, config, {}, binds=binds).start()
    try:
        # The restore unit ran at boot (its condition: the config exists) and put files back.
        b.c.systemctl("restart", "llmuxd-restore", check=True)
        restore_log = b.c.journal("llmuxd-restore")
        assert "is ready to restore" in restore_log, restore_log
        assert b.c.path("/root/.cache/llmuxd-sim").exists()  # put back before the daemon starts
        b.c.systemctl("start", "llmuxd", check=True)
        assert status(b.url)["state"] == "checkpointed"
        r = httpx.post(b.url + "/control/wake", json={"model": "qwen3-0.6b"}, timeout=120).json()
        assert r["state"] == "awake", (r, b.c.journal("llmuxd")[-3000:])
        assert status(b.url)["last_wake_kind"] == "restore"
        assert "restored from" in b.c.journal("llmuxd")
        assert chat(b.url) == answer
    finally:
        b.stop()


def test_restore_into_a_different_image_is_refused(tmp_path, shared):
    """Container B's image differs from A's (a file the image provides was changed there): the
    restore is refused with the reason, not attempted; B cold-starts; the checkpoint is kept."""
    require_mntns()
    base, hf, answer = shared
    ckpt = base / "ckpt-img"
    ckpt.mkdir()
    port, mport = free_ports(2)
    config = cross_container_config(port, mport)
    a = EntrypointContainer("llmuxd-ia", ckpt, hf, config, tmp_path).start()
    try:
        assert chat(a.url) == answer
        assert httpx.post(a.url + "/control/sleep", json={"model": "qwen3-0.6b"}, timeout=120).json()["state"] == "checkpointed"
    finally:
        a.stop()
    manifest = json.loads((ckpt / "qwen3-0.6b" / "images" / "manifest.json").read_text())
    target = next(v["path"] for v in manifest["verify"] if v["origin"] == "image" and v["kind"] == "file")
    b = EntrypointContainer("llmuxd-ib", ckpt, hf, config, tmp_path).start()
    try:
        b.c.run(["touch", "-m", "-d", "2001-01-01 00:00:00", target])  # B's own copy (overlay copy-up)
        r = httpx.post(b.url + "/control/wake", json={"model": "qwen3-0.6b"}, timeout=120).json()
        assert r["state"] == "awake"
        st = status(b.url)
        assert st["last_wake_kind"] == "cold_start", st
        assert "cannot restore here" in st["last_error"] and target in st["last_error"], st["last_error"]
        assert chat(b.url) == answer
        assert (ckpt / "qwen3-0.6b" / "images" / "manifest.json").exists()  # kept: valid for A's image
    finally:
        b.stop()
