"""Booted systemd containers with llmuxd installed by packaging/install.sh, for the tests."""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "infra"))
import nspawn  # noqa: E402

REPO = str(Path(__file__).resolve().parents[1])
VENV = f"{REPO}/.venv"


def require_containers() -> None:
    ok, why = nspawn.available()
    if not ok:
        if os.environ.get("LLMUXD_REQUIRE_SYSTEMD") == "1":
            pytest.fail(f"systemd-nspawn containers required (LLMUXD_REQUIRE_SYSTEMD=1) but not available: {why}")
        pytest.skip(f"systemd-nspawn containers not available: {why}")


class ServiceContainer:
    """A booted container of the test image with llmuxd installed (the `files` stage of
    packaging/install.sh against this checkout's venv) and a config in /etc/llmux."""

    def __init__(self, tag: str, workdir: Path, config: dict, env: dict[str, str], binds=(), watchdog_sec: int = 0):
        self.name = f"llmuxd-t-{tag}-{uuid.uuid4().hex[:6]}"
        self.config = config
        self.url = f"http://127.0.0.1:{config['port']}"
        etc = workdir / f"etc-{self.name}"
        etc.mkdir()
        (etc / "config.json").write_text(json.dumps(config, indent=2))
        self.env = env
        self.watchdog_sec = watchdog_sec
        self.c = nspawn.Container(self.name, binds=[(REPO, REPO), (str(etc), "/etc/llmux"), *binds])

    def start(self) -> "ServiceContainer":
        self.c.start()
        self.c.run(["bash", f"{REPO}/packaging/install.sh", "--stages", "files", "--venv", VENV])
        self.write_file("/etc/default/llmuxd", "".join(f"{k}={v}\n" for k, v in self.env.items()))
        if self.watchdog_sec:
            self.c.run(["sh", "-c", "mkdir -p /etc/systemd/system/llmuxd.service.d && printf "
                        f"'[Service]\\nWatchdogSec={self.watchdog_sec}\\n' > /etc/systemd/system/llmuxd.service.d/wd.conf"
                        " && systemctl daemon-reload"])
        return self

    def stop(self) -> None:
        self.c.stop()

    # helpers
    def write_file(self, path: str, text: str, mode: int = 0o600) -> None:
        """Write a file in the container from the host, so that its content (a secret, say)
        never appears on a command line (which the container's journal records)."""
        host = self.c.path(path)
        host.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(host, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            os.write(fd, text.encode())
            os.fchmod(fd, mode)
        finally:
            os.close(fd)

    def sh(self, cmd: str, check: bool = True, timeout: float = 120):
        return self.c.run(["sh", "-c", cmd], check=check, timeout=timeout)

    def busctl_call(self, *args: str, check: bool = True, user: str | None = None):
        cmd = ["busctl", "--timeout=60", "call", "io.llmux.Llmuxd1", "/io/llmux/Llmuxd1", "io.llmux.Llmuxd1", *args]
        if user:
            cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
        return self.c.run(cmd, check=check)

    def status(self) -> dict:
        return httpx.get(self.url + "/control/status", timeout=30).json()

    def show(self, unit: str, prop: str) -> str:
        return self.c.systemctl("show", unit, "-p", prop, "--value").stdout.strip()

    def wait_active(self, unit: str = "llmuxd", timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.c.systemctl("is-active", unit).stdout.strip() != "active":
            if time.monotonic() > deadline:
                raise AssertionError(f"{unit} not active: {self.c.systemctl('status', unit).stdout}")
            time.sleep(0.1)

    def procs(self, pattern: str) -> list[int]:
        r = self.c.run(["pgrep", "-f", pattern], check=False)
        return [int(p) for p in r.stdout.split()]
