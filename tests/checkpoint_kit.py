"""Shared by the checkpoint trust and confinement tests: one real checkpoint (a CRIU dump of a
simulator tree made by ``llmuxd checkpoint``) per test module, copied into each test's own
folders and edited there, and daemons configured to restore such copies."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import model_entry
from harness import LLMUXD, SIM, free_ports, remove_cgroups

CRIU = "/usr/local/bin/criu"
SECRET_ARG = "sekrit-api-key-123"


@dataclass
class Golden:
    path: Path  # the checkpoint folder
    port: int  # m1's port: a copy restores only where m1 listens there
    env: dict[str, str]  # the dumped tree's environment (HF cache, simulated GPU folder)

    def manifest(self) -> dict:
        return json.loads((self.path / "manifest.json").read_text())


@pytest.fixture(scope="module")
def golden(tmp_path_factory, hf_home):
    root = tmp_path_factory.mktemp("golden")
    (root / "home").mkdir()
    env = {**os.environ, "HOME": str(root / "home"), "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1",
           "LLMUXD_SIM_GPU_DIR": str(root / "gpu")}
    m1_port, port = free_ports(2)
    config = {"models": {"m1": model_entry("m1", m1_port, "discard", "checkpoint", ["--hf-token", SECRET_ARG])},
              "port": port, "metrics_port": 0, "host": "127.0.0.1", "vllm_command": SIM, "log_dir": str(root / "logs"),
              "policy": {"request_timeout_secs": 60, "min_active_secs": 0, "startup_timeout_secs": 30},
              "checkpoint": {"criu_path": CRIU, "images_dir": str(root / "ck")}}
    (root / "config.json").write_text(json.dumps(config))
    r = subprocess.run([LLMUXD, "checkpoint", "m1", "--config", str(root / "config.json")], capture_output=True,
                       text=True, env=env, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    g = Golden(root / "ck" / "m1" / "images", m1_port, env)
    shm = [s["path"] for s in g.manifest()["saved"] if s["path"].startswith("/dev/shm/")]
    yield g
    remove_cgroups(port)  # CRIU re-creates the dump's cgroups (llmuxd-<port>/model-m1) for a restored copy
    for p in shm:  # the copies' restores put these back; a cold start never makes them
        try:
            if stat.S_ISREG(os.lstat(p).st_mode):
                os.unlink(p)
        except FileNotFoundError:
            pass


def plant(golden: Golden, dest: Path, edit=None, model: str | None = None) -> Path:
    """A copy of the golden checkpoint at ``dest``; ``edit(manifest_dict)`` changes its manifest
    (returning bytes replaces the file with them)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(golden.path, dest, symlinks=True)
    if edit is not None or model is not None:
        m = golden.manifest()
        if model is not None:
            m["model"] = model
        out = edit(m) if edit is not None else None
        (dest / "manifest.json").write_bytes(out if isinstance(out, bytes) else json.dumps(m).encode())
    return dest


def snapshot(folder: Path) -> dict:
    """Everything about a folder's tree that a refusal must leave as it was."""
    out = {}
    for p in sorted([folder, *folder.rglob("*")]):
        st = os.lstat(p)
        content = p.read_bytes() if stat.S_ISREG(st.st_mode) and st.st_size < (1 << 20) else None
        out[str(p)] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_ino, content)
    return out


def daemon(make_daemon, golden: Golden, tmp_path: Path, extra_models: dict | None = None, start: bool = True,
           m1: bool = True, **checkpoint):
    """A daemon with m1 (discard + checkpoint, on the golden port: its checkpoint copies restore),
    m2 (offload + keep_running) and ``extra_models``; checkpoints under tmp_path/ck."""
    models = {"m2": model_entry("m2", free_ports(1)[0])}
    if m1:
        # the golden checkpoint's own settings: one made with another command line is not restored
        models["m1"] = model_entry("m1", golden.port, "discard", "checkpoint", ["--hf-token", SECRET_ARG])
    models.update(extra_models or {})
    ck = {"criu_path": CRIU, "images_dir": str(tmp_path / "ck"), **checkpoint}
    return make_daemon(models=models, env=golden.env, checkpoint=ck, start=start)


def extra_model(name: str, path: Path, process: str = "keep_running") -> dict:
    entry = model_entry(name, free_ports(1)[0], "discard" if process == "checkpoint" else "offload", process)
    return {**entry, "checkpoint_path": str(path)}
