"""What the host around llmuxd offers: cgroup v2 (a cgroup of its own to create children under,
kill/freeze, delegation), systemd (PID 1, the unit, sd_notify) and the system D-Bus (its
socket, a connection, llmuxd's policy file).  The facts (:func:`cgroup_facts`,
:func:`systemd_facts`, :func:`dbus_facts`) and their judgement (``*_checks``, pure); none of
them is required, llmuxd runs without each."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any

from ..api.dbus import bus_socket_paths, system_bus_address
from ..isolation.cgroups import cgroup2_mount, own_cgroup
from .probe import read, run
from .report import OK, WARN, Check

DBUS_POLICY = "io.llmux.Llmuxd1.conf"
DBUS_POLICY_DIRS = ("/usr/share/dbus-1/system.d", "/etc/dbus-1/system.d")


def _test_child_cgroup(here: Path) -> dict[str, Any]:
    """mkdir a child of our own cgroup (what llmuxd does for its model cgroups), look, rmdir."""
    probe = here / f"llmuxd-doctor-{os.getpid()}"
    try:
        probe.mkdir()
    except OSError as e:
        return {"writable": False, "writable_detail": f"cannot create a cgroup under {here}: {e.strerror}"}
    try:
        return {"writable": True, "writable_detail": f"created and removed {probe.name} under {here}",
                "kill": (probe / "cgroup.kill").exists(), "freeze": (probe / "cgroup.freeze").exists()}
    finally:
        try:
            probe.rmdir()
        except OSError:
            pass


def cgroup_facts() -> dict[str, Any]:
    mount = cgroup2_mount()
    f: dict[str, Any] = {"mount": str(mount) if mount else None, "layout": None, "controllers": None,
                         "own": own_cgroup(), "writable": False, "writable_detail": "", "kill": None,
                         "freeze": None, "delegated": None, "delegated_detail": ""}
    if mount is None:
        return f
    f["layout"] = {"/sys/fs/cgroup": "pure", "/sys/fs/cgroup/unified": "hybrid"}.get(str(mount), "other")
    ctl = read(mount / "cgroup.controllers")
    f["controllers"] = ctl.split() if ctl is not None else None
    if f["own"] is None:
        f["writable_detail"] = "this process is not in the cgroup v2 hierarchy"
        return f
    here = mount / f["own"].lstrip("/")
    f.update(_test_child_cgroup(here))
    if f["kill"] is None and f["own"] != "/":
        f["kill"], f["freeze"] = (here / "cgroup.kill").exists(), (here / "cgroup.freeze").exists()
    if os.environ.get("INVOCATION_ID"):
        try:
            f["delegated"] = os.getxattr(here, "trusted.delegate") == b"1"
            f["delegated_detail"] = f"{here}: trusted.delegate={'1' if f['delegated'] else 'unset'}"
        except OSError:
            f["delegated_detail"] = f"{here}: no trusted.delegate mark (systemd < 251, or not delegated)"
    return f


def systemd_facts() -> dict[str, Any]:
    comm = (read("/proc/1/comm") or "?").strip()
    booted = os.path.isdir("/run/systemd/system")  # sd_booted()
    f: dict[str, Any] = {"pid1": comm, "booted": booted, "invocation_id": os.environ.get("INVOCATION_ID"),
                         "notify_socket": os.environ.get("NOTIFY_SOCKET"), "unit": None}
    if booted and shutil.which("systemctl"):
        rc, out = run(["systemctl", "show", "-p", "LoadState", "-p", "ActiveState", "-p", "Delegate",
                       "llmuxd.service"], timeout=10)
        if rc == 0:
            f["unit"] = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return f


async def _bus_connect(address: str, timeout: float) -> str | None:
    """None when a connection to the bus at ``address`` says hello within ``timeout``; else why not."""
    from dbus_fast.aio import MessageBus

    bus = MessageBus(bus_address=address)
    try:
        await asyncio.wait_for(bus.connect(), timeout)
    except asyncio.TimeoutError:
        return f"no answer in {timeout:g} s"
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    bus.disconnect()
    return None


def dbus_facts(timeout: float = 2.0) -> dict[str, Any]:
    address = system_bus_address()
    sockets = [p for p in bus_socket_paths(address) if os.path.exists(p)]
    f: dict[str, Any] = {"address": address, "socket": sockets[0] if sockets else None, "connect": False,
                         "connect_detail": "", "policy": None}
    if sockets:
        try:
            err = asyncio.run(_bus_connect(address, timeout))
        except RuntimeError as e:  # called from a running loop
            err = str(e)
        f["connect"], f["connect_detail"] = err is None, err or "connected"
    for d in DBUS_POLICY_DIRS:
        if os.path.isfile(os.path.join(d, DBUS_POLICY)):
            f["policy"] = os.path.join(d, DBUS_POLICY)
            break
    return f


def cgroup_checks(facts: dict[str, Any]) -> list[Check]:
    """The cgroups lines, delegation included (judged from the systemd facts)."""
    checks: list[Check] = []
    add = checks.append
    cg = facts["cgroup"]
    if not cg["mount"]:
        add(Check("cgroups", "cgroup v2", WARN, "no cgroup2 mount: model trees are tracked by process session",
                  "mount cgroup2 (e.g. Docker --cgroupns=private, or systemd's unified hierarchy)"))
    else:
        ctl = cg["controllers"]
        ctl_s = " ".join(ctl) if ctl else "none (resource controllers are on v1)"
        add(Check("cgroups", "cgroup v2", OK, f"{cg['layout']} at {cg['mount']}; controllers: {ctl_s}"))
        add(Check("cgroups", "own cgroup", OK if cg["own"] else WARN, cg["own"] or "not in the v2 hierarchy"))
        add(Check("cgroups", "writable", OK if cg["writable"] else WARN, cg["writable_detail"],
                  "" if cg["writable"] else "run as root / with Delegate=yes; without it trees are tracked by session"))
        if cg["kill"] is not None:
            missing = [n for n, v in (("cgroup.kill", cg["kill"]), ("cgroup.freeze", cg["freeze"])) if not v]
            add(Check("cgroups", "kill/freeze", WARN if missing else OK,
                      f"missing {', '.join(missing)} (kernel < 5.14 / 5.2): kill falls back to signals, no freeze"
                      if missing else "cgroup.kill and cgroup.freeze present"))
    sd = facts["systemd"]
    if sd["invocation_id"]:
        add(Check("cgroups", "delegated", OK if cg["delegated"] else WARN, cg["delegated_detail"],
                  "" if cg["delegated"] else "set Delegate=yes in the unit"))
    elif sd["unit"] and sd["unit"].get("LoadState") == "loaded":
        d = sd["unit"].get("Delegate") == "yes"
        add(Check("cgroups", "delegated", OK if d else WARN, f"llmuxd.service: Delegate={sd['unit'].get('Delegate')}",
                  "" if d else "set Delegate=yes in llmuxd.service"))
    else:
        add(Check("cgroups", "delegated", OK, "not under systemd: llmuxd makes llmuxd-<port> under its own cgroup"))
    return checks


def systemd_checks(facts: dict[str, Any]) -> list[Check]:
    """PID 1, the unit, sd_notify."""
    checks: list[Check] = []
    add = checks.append
    sd = facts["systemd"]
    if sd["booted"]:
        add(Check("systemd", "PID 1", OK, f"systemd ({sd['pid1']})"))
    else:
        add(Check("systemd", "PID 1", WARN, f"{sd['pid1']}, not systemd: llmuxd runs standalone (no unit, "
                  "watchdog or journal; fine as a container entrypoint)"))
    add(Check("systemd", "unit", OK, f"running under a unit (INVOCATION_ID={sd['invocation_id']})"
              if sd["invocation_id"] else "not started by systemd (normal for an interactive run)"))
    if sd["unit"] is not None and not sd["invocation_id"]:
        u = sd["unit"]
        add(Check("systemd", "llmuxd.service", OK if u.get("LoadState") == "loaded" else WARN,
                  f"LoadState={u.get('LoadState')} ActiveState={u.get('ActiveState')}",
                  "" if u.get("LoadState") == "loaded" else "packaging/install.sh installs it"))
    add(Check("systemd", "NOTIFY_SOCKET", OK, f"{sd['notify_socket']}: sd_notify on" if sd["notify_socket"]
              else "unset: sd_notify off"))
    return checks


def dbus_checks(facts: dict[str, Any]) -> list[Check]:
    """The system bus and llmuxd's policy file on it."""
    checks: list[Check] = []
    add = checks.append
    db = facts["dbus"]
    if not db["socket"]:
        add(Check("D-Bus", "system bus", WARN, f"no socket for {db['address']}: D-Bus control is off "
                  "(HTTP /control still works)"))
    else:
        add(Check("D-Bus", "system bus", OK if db["connect"] else WARN,
                  f"{db['socket']}: {db['connect_detail']}"))
    add(Check("D-Bus", "policy", OK if db["policy"] else WARN,
              db["policy"] or f"no {DBUS_POLICY} in {' or '.join(DBUS_POLICY_DIRS)}: the bus refuses the name",
              "" if db["policy"] else f"install dbus/{DBUS_POLICY} into {DBUS_POLICY_DIRS[0]}"))
    return checks
