"""`llmuxd checkpoint`, `inspect-checkpoint`, `restore --detached` (then adopted by `serve`),
and `prepare-restore`, as a user runs them."""

from __future__ import annotations

import json
import re
import subprocess

import httpx
import pytest

from conftest import model_entry
from harness import LLMUXD, free_ports
from llmuxd.commands.inspect_checkpoint import CheckpointReport
from llmuxd.isolation.procfs import alive
from llmuxd.status import ModelStatus

pytestmark = [pytest.mark.criu]


def test_checkpoint_inspect_restore_detached_then_adopted(make_daemon, tmp_path, expected):
    p = free_ports(1)
    d = make_daemon(models={"m1": model_entry("m1", p[0], "discard", "stop")}, start=False,
                    checkpoint={"criu_path": "/usr/local/bin/criu", "images_dir": str(tmp_path / "ck")})
    d.config_path.write_text(json.dumps(d.config))
    run = lambda *a: subprocess.run([LLMUXD, *a, "--config", str(d.config_path)], capture_output=True, text=True,  # noqa: E731
                                    env=d.env, timeout=120)
    r = run("checkpoint", "m1")  # the model's process policy is `stop`: checkpoint forces it
    assert r.returncode == 0, r.stderr
    assert "m1: cold_start in" in r.stdout and "checkpointed to" in r.stdout
    assert said(r.stderr) == [  # its phases, as they happened (stderr is no terminal: a line each)
        "m1 cold_start", "m1 cold_start: spawn", "m1 cold_start: load", "m1 cold_start done",
        "m1 sleep", "m1 sleep: canary", "m1 sleep: weights", "m1 sleep: criu_dump", "m1 sleep: manifest",
        "m1 sleep: write", "m1 sleep: stop", "m1 sleep done"]
    path = tmp_path / "ck" / "m1" / "images"
    r = subprocess.run([LLMUXD, "inspect-checkpoint", str(path)], capture_output=True, text=True, env=d.env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "own PID namespace: True" in r.stdout and "saved (put back byte-exact)" in r.stdout
    assert "/dev/shm/psm_" in r.stdout and "restorable here" in r.stdout
    r = subprocess.run([LLMUXD, "inspect-checkpoint", str(path), "--json"], capture_output=True, text=True, env=d.env)
    assert r.returncode == 0, r.stdout + r.stderr
    report = CheckpointReport.model_validate_json(r.stdout)
    assert report.restorable and report.problems == [] and report.manifest.own_pidns and report.manifest.model == "m1"
    assert any(f.path.startswith("/dev/shm/psm_") for f in report.manifest.saved)
    r = run("prepare-restore")
    assert r.returncode == 0 and "is ready to restore" in r.stderr, r.stderr
    r = run("restore", "m1", "--detached", "--json")
    assert r.returncode == 0, r.stderr
    steps = ["read_manifest", "verify_images", "prepare", "criu_restore", "amx_right", "health", "wake_sequence",
             "canary"]
    assert said(r.stderr) == ["m1 restore", *(f"m1 restore: {s}" for s in steps
                                              if s != "amx_right" or f"m1 restore: {s}" in r.stderr),
                              "m1 restore done"], r.stderr
    restored = ModelStatus.model_validate_json(r.stdout)
    assert restored.state == "awake" and restored.last_wake_kind == "restore" and restored.last_restore is not None
    root = restored.pid
    assert alive(root)
    port = d.config["models"]["m1"]["port"]
    direct = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": "m1", "prompt": "d", "max_tokens": 3})
    assert direct.json()["choices"][0]["text"] == expected("m1", "d", 3)
    d.start()  # the daemon adopts the detached tree: no second backend
    st = d.status()["models"]["m1"]
    assert st["state"] == "awake" and st["pid"] == root, st
    assert "adopted running tree" in d.log()
    # The daemon refuses to be doubled by the CLI.
    r = run("restore", "m1")
    assert r.returncode == 1 and "llmuxd is running on port" in r.stderr
    r = subprocess.run([LLMUXD, "inspect-checkpoint", str(tmp_path / "nothing")], capture_output=True, text=True)
    assert r.returncode == 1 and "not a checkpoint" in r.stderr


def said(stderr: str) -> list[str]:
    """The progress lines of a command, without their time stamps and durations."""
    lines = [line for line in stderr.splitlines() if re.match(r"\d\d:\d\d:\d\d\.\d{3} ", line)]
    return [re.sub(r" done in [\d.]+ s$", " done", line[13:]) for line in lines]


def test_validate_prints_a_table_over_policies(make_daemon, tmp_path):
    p = free_ports(1)
    d = make_daemon(models={"m1": model_entry("m1", p[0])}, start=False,
                    checkpoint={"criu_path": "/usr/local/bin/criu", "images_dir": str(tmp_path / "ck")})
    d.config_path.write_text(json.dumps(d.config))
    r = subprocess.run([LLMUXD, "validate", "m1", "--config", str(d.config_path), "--cycles", "1", "--policies",
                        "offload+keep_running,discard+keep_running,discard+checkpoint,retain+stop"],
                       capture_output=True, text=True, env=d.env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[1].split()[:3] == ["POLICY", "CYCLE", "SLEEP"]
    rows = {ln.split()[0]: ln.split() for ln in lines[2:-1]}
    assert rows["discard+checkpoint"][3] == "checkpointed" and rows["discard+checkpoint"][5] == "restore", r.stdout
    assert rows["retain+stop"][5] == "cold_start" and rows["offload+keep_running"][5] == "wake"
    assert all(row[-1] == "yes" for row in rows.values()) and lines[-1] == "all responses matched"
    assert "0M" in rows["discard+checkpoint"][6].split("/")[1]  # nothing resident while checkpointed
