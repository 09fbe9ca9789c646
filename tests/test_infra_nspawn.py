"""The nspawn test infrastructure itself: real containers with systemd as PID 1 from the test image
(tests/infra/build-image.sh), driven from the host through tests/infra/nspawn.py."""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "infra"))
import nspawn  # noqa: E402

REPO = str(Path(__file__).resolve().parents[1])

pytestmark = [pytest.mark.systemd, pytest.mark.slow]


def _require_containers() -> None:
    ok, why = nspawn.available()
    if not ok:
        if os.environ.get("LLMUXD_REQUIRE_SYSTEMD") == "1":
            pytest.fail(f"systemd-nspawn containers required (LLMUXD_REQUIRE_SYSTEMD=1) but not available: {why}")
        pytest.skip(f"systemd-nspawn containers not available: {why}")


def _name(tag: str) -> str:
    return f"llmuxd-t-{tag}-{uuid.uuid4().hex[:8]}"


def test_boot_systemd_dbus_criu() -> None:
    _require_containers()
    name = _name("boot")
    c = nspawn.Container(name, binds=[(REPO, REPO)])
    try:
        c.start()
        print(f"{name}: booted in {c.boot_seconds:.2f} s ({c.state})")
        assert c.state in ("running", "degraded")
        # systemd is PID 1 in the container's own PID namespace.
        assert Path(f"/proc/{c.leader}/comm").read_text().strip() == "systemd"
        assert c.run(["cat", "/proc/1/comm"]).stdout.strip() == "systemd"
        assert c.systemctl("is-system-running").stdout.strip() in ("running", "degraded")
        # The container's own system bus, reached from the host.
        names = c.busctl("list", "--no-legend", check=True).stdout
        assert "org.freedesktop.DBus" in names and "org.freedesktop.systemd1" in names
        assert c.bus_address == f"unix:path=/proc/{c.leader}/root/run/dbus/system_bus_socket"
        assert Path(c.bus_address.split("=", 1)[1]).is_socket()
        # The checkout is bound at the same path, so its venv works inside too.
        assert c.run(["test", "-x", f"{REPO}/.venv/bin/python"], check=False).returncode == 0
        # Exit codes and stdio come back through systemd-run.
        r = c.run("echo out; echo err >&2; exit 3", check=False)
        assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")
        # CRIU 4.2 from the image (packaging/install-criu.sh) works inside.
        t0 = time.monotonic()
        r = c.run(["criu", "check"], check=False)
        print(f"{name}: criu check in {time.monotonic() - t0:.2f} s: {r.stdout.strip()} {r.stderr.strip()}")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "Looks good" in r.stdout + r.stderr
        assert c.run(["criu", "--version"]).stdout.startswith("Version: 4.2")
        # The journal, read from the host.
        c.run(["systemd-cat", "-t", "llmuxd-infra-test", "echo", "hello-journal"])
        assert "hello-journal" in c.journal(args=["-t", "llmuxd-infra-test"])
        entries = c.journal("dbus.service", json_output=True)
        assert any(e.get("_SYSTEMD_UNIT") == "dbus.service" for e in entries)
        assert all("dbus.service" in (e.get("_SYSTEMD_UNIT"), e.get("UNIT")) for e in entries)
    finally:
        t0 = time.monotonic()
        c.stop()
        print(f"{name}: stopped in {time.monotonic() - t0:.2f} s")
    assert nspawn.leftovers(name) == []


def test_two_containers_have_fresh_writable_layers() -> None:
    _require_containers()
    a = nspawn.Container(_name("a"), binds=[(REPO, REPO)])
    b = nspawn.Container(_name("b"), binds=[(REPO, REPO)])
    tag = uuid.uuid4().hex[:8]
    # /tmp is a tmpfs of its own in each container; /var/tmp and /opt are on the overlay.
    markers = [f"/tmp/llmuxd-marker-{tag}", f"/var/tmp/llmuxd-marker-{tag}", f"/opt/llmuxd/marker-{tag}"]
    try:
        a.start()
        b.start()
        print(f"boot: {a.name} {a.boot_seconds:.2f} s, {b.name} {b.boot_seconds:.2f} s")
        assert a.leader != b.leader
        for marker in markers:
            a.run(["sh", "-c", f"echo from-a > {marker}"])
            assert a.run(["cat", marker]).stdout == "from-a\n"
            assert a.path(marker).read_text() == "from-a\n"
            assert b.run(["test", "-e", marker], check=False).returncode == 1
            assert not b.path(marker).exists()
            # The image tree itself is never written.
            assert not (a.image_dir / marker.lstrip("/")).exists()
        # Each has its own machine file and its own cgroups.
        assert (nspawn.MACHINES_DIR / a.name).exists() and (nspawn.MACHINES_DIR / b.name).exists()
        assert all(d.is_dir() for d in nspawn.cgroup_dirs(a.name) + nspawn.cgroup_dirs(b.name))
    finally:
        errors = []
        for c in (a, b):
            try:
                c.stop()
            except nspawn.ContainerError as e:
                errors.append(str(e))
        assert not errors
    assert nspawn.leftovers(a.name) == [] and nspawn.leftovers(b.name) == []
    assert not a.running and not b.running


def test_stop_cleans_up_after_a_failed_start(tmp_path: Path) -> None:
    _require_containers()
    name = _name("fail")
    # A bind of a missing host path makes nspawn fail after the cgroups and log are made.
    c = nspawn.Container(name, binds=[(str(tmp_path / "missing"), "/mnt/missing")], boot_timeout=20)
    with pytest.raises(nspawn.ContainerError, match="systemd-nspawn exited"):
        c.start()
    assert nspawn.leftovers(name) == []
    c.stop()  # again: a no-op
