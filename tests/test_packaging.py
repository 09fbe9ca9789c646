"""The image definition: the Dockerfile lints clean and names only files that exist; the
entrypoint picks systemd or llmuxd as documented.  (tests/test_docker.py builds the image and runs
it in the real Docker engine; the install script is also exercised by the tests' container image,
tests/infra/build-image.sh.)"""

from __future__ import annotations

import os
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
    # vLLM >= 0.17: before, sleep mode freed no GPU memory (weights outside its allocator's pool).
    assert re.search(r"^ARG BASE_IMAGE=vllm/vllm-openai:v0\.32\.0$", text, re.M)
    args = dict(re.findall(r"^ARG (\w+)=(\S*)$", text, re.M))
    for line in re.findall(r"^COPY (?!--from=)(.+)$", text, re.M):
        for src in line.split()[:-1]:
            src = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], src)
            assert (REPO / src).exists(), src
    assert "packaging/install.sh --stages criu" in text  # build stage: CRIU's root
    assert "packaging/install.sh --stages system,files,enable --venv /opt/llmuxd/venv" in text


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
    env = {**os.environ, "LLMUXD_RUN_DIR": str(tmp_path / "run"), "LLMUXD_VENV": str(tmp_path / "no-venv")}
    subprocess.run(cmd, check=True, env=env)
    out = (tmp_path / "calls").read_text()
    (tmp_path / "calls").unlink()
    return out


def test_entrypoint_boots_systemd_as_pid1_else_serves(tmp_path):
    assert _entrypoint(tmp_path, pid1=True) == "systemd\n"
    assert _entrypoint(tmp_path) == ("llmuxd prepare-restore --config /etc/llmux/config.json\n"
                                     "llmuxd serve --config /etc/llmux/config.json\n")
    assert _entrypoint(tmp_path, "status", "--json") == "llmuxd status --json\n"
