"""The image definition: the Dockerfile lints clean and names only files that exist; the
entrypoint picks systemd or llmuxd as documented.  (No Docker engine here: the install script
itself is exercised by the tests' container image, tests/infra/build-image.sh.)"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HADOLINT = Path(sys.executable).parent / "hadolint"


def test_dockerfile_lints_clean():
    r = subprocess.run([str(HADOLINT), str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_copies_existing_paths_and_uses_the_shared_install():
    text = (REPO / "Dockerfile").read_text()
    assert "FROM vllm/vllm-openai:v0.15.1" in text
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        for src in line.split()[:-1]:
            assert (REPO / src).exists(), src
    assert "packaging/install.sh --stages system,criu,python,files,enable" in text


def _entrypoint(tmp_path, *args, pid1=False):
    """Run the entrypoint with llmuxd and systemd replaced by recorders (no real daemon)."""
    script = (REPO / "packaging" / "entrypoint.sh").read_text()
    script = script.replace("/lib/systemd/systemd", f"{tmp_path}/systemd").replace("/usr/local/bin/llmuxd", f"{tmp_path}/llmuxd")
    for tool in ("systemd", "llmuxd"):
        (tmp_path / tool).write_text(f"#!/bin/sh\necho {tool} \"$@\" >> {tmp_path}/calls\n")
        (tmp_path / tool).chmod(0o755)
    (tmp_path / "ep.sh").write_text(script)
    cmd = ["sh", str(tmp_path / "ep.sh"), *args]
    if pid1:  # its own PID namespace, as a plain `docker run`
        cmd = ["unshare", "--pid", "--fork", "--mount-proc", *cmd]
    subprocess.run(cmd, check=True)
    out = (tmp_path / "calls").read_text()
    (tmp_path / "calls").unlink()
    return out


def test_entrypoint_boots_systemd_as_pid1_else_serves(tmp_path):
    assert _entrypoint(tmp_path, pid1=True) == "systemd\n"
    assert _entrypoint(tmp_path) == ("llmuxd prepare-restore --config /etc/llmux/config.json\n"
                                     "llmuxd serve --config /etc/llmux/config.json\n")
    assert _entrypoint(tmp_path, "status", "--json") == "llmuxd status --json\n"
