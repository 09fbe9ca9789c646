"""CRIU checkpoint and restore through llmuxd, in the same container (this machine): real
dumps of real simulator trees, restored and checked against answers computed from the weights."""

from __future__ import annotations

import json

import httpx
import pytest

from conftest import model_entry
from harness import free_ports
from llmuxd.isolation.procfs import alive

pytestmark = [pytest.mark.criu]


def complete(d, model, prompt="hello", n=4):
    r = httpx.post(d.url + "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": n}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@pytest.fixture
def ck_daemon(make_daemon, tmp_path):
    def make(keep_images=True, **kw):
        p = free_ports(2)
        models = {"m1": model_entry("m1", p[0], "discard", "checkpoint"), "m2": model_entry("m2", p[1])}
        return make_daemon(models=models, checkpoint={"criu_path": "/usr/local/bin/criu",
                                                      "images_dir": str(tmp_path / "ck"), "keep_images": keep_images},
                           **kw)
    return make


def test_checkpoint_restore_same_container(ck_daemon, expected, tmp_path):
    d = ck_daemon()
    assert complete(d, "m1", "q") == expected("m1", "q", 4)
    before = d.status()["models"]["m1"]["pids"]
    r = d.control("sleep", "m1")
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "checkpointed", r.json()
    ckdir = tmp_path / "ck" / "m1" / "images"
    manifest = json.loads((ckdir / "manifest.json").read_text())
    assert manifest["model"] == "m1" and manifest["own_pidns"] and manifest["sleep_level"] == 2
    assert manifest["canary"] and manifest["images"]
    assert not any(alive(p) for p in before)
    st = d.status()["models"]["m1"]
    assert st["pids"] == [] and st["last_checkpoint"]["image_bytes"] > 0
    # Wake: a restore, not a cold start; the answer is right (weights reloaded after discard).
    r = d.control("wake", "m1")
    assert r.json()["state"] == "awake"
    st = d.status()["models"]["m1"]
    assert st["last_wake_kind"] == "restore", st
    assert st["last_restore"]["seconds"]["criu_restore"] > 0
    assert complete(d, "m1", "q2") == expected("m1", "q2", 4)
    # keep_images: the next sleep reuses the images (no new dump), the next wake restores again.
    assert d.control("sleep", "m1").json()["state"] == "checkpointed"
    assert d.status()["models"]["m1"]["last_checkpoint"] == {"reused": True}
    assert complete(d, "m1", "q3") == expected("m1", "q3", 4)
    assert d.status()["models"]["m1"]["last_wake_kind"] == "restore"
    assert "restored from" in d.log()


def test_checkpoint_found_at_startup(ck_daemon, expected):
    d = ck_daemon()
    complete(d, "m1")
    assert d.control("sleep", "m1").json()["state"] == "checkpointed"
    d.stop()
    assert d.leftovers == []
    d.start()
    assert d.status()["models"]["m1"]["state"] == "checkpointed"
    assert complete(d, "m1", "z") == expected("m1", "z", 4)
    assert d.status()["models"]["m1"]["last_wake_kind"] == "restore"


def test_two_models_alternating_under_load_with_checkpoint_eviction(make_daemon, tmp_path, sim_env, expected):
    from harness import alternating_load
    from test_switching import GpuWatch, metric
    from llmuxd.sim import gpu as simgpu

    p = free_ports(2)
    extra = ["--sim-token-delay", "0.02"]
    models = {"m1": model_entry("m1", p[0], "discard", "checkpoint", extra),
              "m2": model_entry("m2", p[1], "discard", "checkpoint", extra)}
    d = make_daemon(models=models, checkpoint={"criu_path": "/usr/local/bin/criu", "images_dir": str(tmp_path / "ck")})
    with GpuWatch(sim_env["LLMUXD_SIM_GPU_DIR"]) as gpu:
        results, errors = alternating_load(d.url, 12, 3, 5)
    assert not errors, errors[:3]
    assert len(results) == 36 and all(t == expected(m, pr, 5) for m, pr, t in results)
    assert gpu.max_leases <= 1 and gpu.max_used <= simgpu.budget()
    kinds = {d.status()["models"][m]["last_wake_kind"] for m in ("m1", "m2")}
    assert "restore" in kinds, d.status()
    assert metric(d, "llmuxd_switches_total", result="error") == 0
    assert metric(d, "llmuxd_restore_failures_total") == 0


def test_restore_follows_what_was_dumped_not_the_current_policy(ck_daemon, expected):
    """A checkpoint made after a level-2 sleep still gets reload_weights on wake when the
    model's policy has changed since (else vLLM would answer garbage)."""
    d = ck_daemon()
    complete(d, "m1")
    assert d.control("sleep", "m1").json()["state"] == "checkpointed"
    d.stop()
    d.config["models"]["m1"]["eviction"] = {"weights": "offload", "process": "keep_running"}
    d.start()
    assert d.status()["models"]["m1"]["state"] == "checkpointed"
    assert complete(d, "m1", "p") == expected("m1", "p", 4)
    assert d.status()["models"]["m1"]["last_wake_kind"] == "restore"


def test_checkpoint_on_stop(ck_daemon, expected):
    """`checkpoint_on_stop`: stopping llmuxd checkpoints the running checkpoint-policy models, so
    the next llmuxd (this container or a new one) restores them instead of cold-starting."""
    d = ck_daemon(checkpoint_on_stop=True)
    complete(d, "m2")
    complete(d, "m1")  # m1 awake, m2 asleep (offload + keep_running: not a checkpoint model)
    assert d.stop() == 0 and d.leftovers == []
    assert "checkpointing m1 before stopping" in d.log()
    d.start()
    st = d.status()["models"]
    assert st["m1"]["state"] == "checkpointed" and st["m2"]["state"] == "stopped"
    assert complete(d, "m1", "w") == expected("m1", "w", 4)
    assert d.status()["models"]["m1"]["last_wake_kind"] == "restore"
