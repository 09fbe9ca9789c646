"""llmuxd as the entrypoint of a mount-namespace container (tests/infra/mntns.py), as the image
runs it with ``docker run --pid=host --network=host`` and no systemd: packaging/install.sh's
``files`` stage against a venv of the host, then packaging/entrypoint.sh (prepare-restore, then
``exec llmuxd serve``), config at /etc/llmux/config.json, the checkpoint folder and the HF cache
bound in.  Used by the cross-container tests (tests/test_cross_container.py, tests/test_vllm.py)
and the soak run (bench/soak.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import httpx

import mntns
from container import Container, ContainerError, terminate

REPO = Path(__file__).resolve().parents[2]
CKPT = "/tmp/llmux-checkpoints"  # the container's paths
HF = "/root/.cache/huggingface"
CONFIG = "/etc/llmux/config.json"
LOG_DIR = "/var/log/llmuxd"
ENTRY_LOG = f"{LOG_DIR}/entrypoint.log"


class EntrypointContainer(Container):
    """Container ``name`` with the checkpoint folder ``ckpt`` and the HF cache ``hf`` bound in and
    ``config`` (written to ``workdir``) as its llmuxd's config; ``env``: added to the daemon's
    environment; ``venv``: the host's venv that /usr/local/bin/llmuxd points to (default: this
    interpreter's).  ``start()`` runs the daemon; ``stop_daemon()`` and ``spawn()`` restart it
    inside; ``follow()`` reads the entrypoint's log as it grows; ``c`` is the MountContainer."""

    def __init__(self, name: str, ckpt: Path, hf: Path, config: dict, workdir: Path, env: dict | None = None,
                 *, venv: str | os.PathLike | None = None):
        super().__init__(name)
        cfg = workdir / f"{name}-config.json"
        cfg.write_text(json.dumps(config, indent=2))
        self.port = config["port"]
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = env
        self.venv = str(venv or sys.prefix)
        self.c = mntns.MountContainer(name, binds=[(str(ckpt), CKPT), (str(hf), HF), (str(cfg), CONFIG),
                                                   *mntns.repo_binds(str(REPO))])
        self.proc: subprocess.Popen | None = None  # the entrypoint, then llmuxd (same PID)
        self.log_offset = 0
        self.log_text = ""  # everything follow() read of the entrypoint log so far
        self.lifetimes = 0  # daemons started

    def start(self, timeout: float = 60) -> "EntrypointContainer":
        self.c.start()
        # The image's install (files stage: units, D-Bus policy, /usr/local/bin/llmuxd -> venv).
        self.c.run(["bash", f"{REPO}/packaging/install.sh", "--stages", "files", "--venv", self.venv])
        self.spawn(timeout)
        return self

    def spawn(self, timeout: float = 60) -> None:
        """The entrypoint (prepare-restore, then `exec llmuxd serve`); returns once llmuxd answers
        /health."""
        self.proc = self.c.spawn(["sh", f"{REPO}/packaging/entrypoint.sh"], stdout=ENTRY_LOG, env=self.env)
        self.lifetimes += 1
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                self.follow()
                raise RuntimeError(f"{self.name}: the entrypoint exited with {self.proc.returncode}:\n"
                                   + self.log_text[-3000:])
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: llmuxd did not answer /health in {timeout} s:\n"
                                   + self.log_text[-3000:])
            time.sleep(0.1)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop_daemon(self, timeout: float, kill_wait: float | None = None) -> tuple[int | None, float]:
        """SIGTERM llmuxd (as `docker stop` does, with a long stop timeout), SIGKILL after `timeout`
        s: (its exit status, None if it had to be killed; seconds taken)."""
        assert self.proc is not None
        t0 = time.monotonic()
        rc = self.proc.returncode if terminate(self.proc, timeout, kill_wait=kill_wait) else None
        return rc, time.monotonic() - t0

    def stop(self, timeout: float = 120) -> None:
        """As ``docker stop`` with a long stop timeout: llmuxd stopped (stop_daemon(): it stops its
        models and removes its cgroups; a vLLM tree takes more than the container's own 2 s of
        grace), then the container ended."""
        try:
            if self.proc is not None:
                self.stop_daemon(timeout, kill_wait=10)
        finally:
            self.c.stop()

    @property
    def started(self) -> bool:
        return self.c.started

    def _root_pid(self) -> int:
        return self.c._root_pid()

    def run(self, cmd: str | Sequence[str], check: bool = True, timeout: float | None = 120.0, *,
            input: str | bytes | None = None, env: dict[str, str] | None = None, cwd: str | None = None,
            text: bool = True) -> subprocess.CompletedProcess:
        return self.c.run(cmd, check, timeout, input=input, env=env, cwd=cwd, text=text)

    # ---------------------------------------------------------------- its logs

    def log(self) -> str:
        """The whole entrypoint log (llmuxd's, with its models' lines)."""
        return self.path(ENTRY_LOG).read_text(errors="replace")

    def follow(self) -> str:
        """The new part of the entrypoint log (complete lines only)."""
        try:
            with open(self.path(ENTRY_LOG), "rb") as f:
                f.seek(self.log_offset)
                data = f.read()
        except (OSError, ContainerError):
            return ""
        end = data.rfind(b"\n") + 1
        self.log_offset += end
        new = data[:end].decode(errors="replace")
        self.log_text += new
        return new

    def copy_logs(self, dest: Path | None) -> None:
        """Copy the container's /var/log/llmuxd (llmuxd's and its models' logs) to dest/NAME."""
        if dest is None:
            return
        d = dest / self.name
        d.mkdir(parents=True, exist_ok=True)
        try:
            for p in self.path(LOG_DIR).iterdir():
                if p.is_file():
                    shutil.copyfile(p, d / p.name)
        except (OSError, ContainerError):
            pass
