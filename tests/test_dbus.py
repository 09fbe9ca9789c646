"""D-Bus transport: a real private dbus-daemon with our policy file, the transport running in
process over a real Switcher with simulator backends, driven by the real busctl / dbus-send.

Three private buses; the first two are system-bus-like and include ``dbus/io.llmux.Llmuxd1.conf``:
* ``strict`` denies method calls by default, like the system bus: what a non-root user can do
  there comes from our file's allow rules;
* ``open`` allows method calls by default: what a non-root user is refused there comes from our
  file's deny rule;
* ``permissive`` has no policy of ours and lets anyone own any name and call anything, like a
  session bus or a bus at a custom address: what a non-root user is refused there comes from
  llmuxd's own check of the caller's uid.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from conftest import model_entry
from dbus_kit import (
    NOBODY, TOOLS, Bus, Monitor, busctl, call, dbus_send, get_property, parse_sd, sim_daemon,
)
from harness import REPO, free_ports, wait_until
from test_progress import Holds
from llmuxd.api.dbus import (
    BUS_NAME, ERROR_PREFIX, INTERFACE, OBJECT_PATH, DbusStartError, DbusTransport, to_dbus_error,
)
from llmuxd.errors import (
    BackendDied, BadRequest, NotSupported, QueueTimeout, ShuttingDown, SwitchFailed, TransitionFailed,
    UnknownModel,
)

pytestmark = TOOLS


@pytest.fixture(scope="module")
def buses():
    folder = Path(tempfile.mkdtemp(prefix="llmuxd-dbus-"))
    folder.chmod(0o755)  # the non-root user must reach the sockets
    started: list[Bus] = []
    try:
        started.append(Bus(folder, "strict", allow_method_calls=False))
        started.append(Bus(folder, "open", allow_method_calls=True))
        started.append(Bus(folder, "permissive", allow_method_calls=True, our_policy=False))
        yield {"strict": started[0], "open": started[1], "permissive": started[2]}
    finally:
        for bus in started:
            bus.kill()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def daemon(buses, hf_home, tmp_path_factory):
    ports = free_ports(2)
    models = {"m1": model_entry("m1", ports[0]), "m2": model_entry("m2", ports[1])}
    tmp = tmp_path_factory.mktemp("dbus-daemon")
    holds = Holds(tmp / "holds")  # the simulator, whose start a test can hold (daemon.holds)
    with sim_daemon(list(buses.values()), models, hf_home, tmp, vllm_command=str(holds.command)) as d:
        d.holds = holds
        yield d


def inspect(bus: Bus, nobody: bool = False) -> tuple[str, dict[str, dict]]:
    r = call(bus, "Inspect", json_out=True, nobody=nobody)
    assert r.returncode == 0, r.stderr
    reply = json.loads(r.stdout)
    assert reply["type"] == "sa(ssaussddss)"
    active, models = reply["data"]
    keys = ("state", "pids", "weights", "process", "last_wake_secs", "last_sleep_secs", "last_wake_kind",
            "last_error")
    return active, {m[0]: dict(zip(keys, m[1:])) for m in models}


def assert_inspect_agrees(inspected: tuple[str, dict], st: dict) -> None:
    active, models = inspected
    assert active == (st["active_model"] or "")
    assert list(models) == list(st["models"])
    for name, m in models.items():
        s = st["models"][name]
        assert m == {
            "state": s["state"], "pids": s["pids"], "weights": s["eviction"]["weights"],
            "process": s["eviction"]["process"],
            "last_wake_secs": -1 if s["last_wake_secs"] is None else pytest.approx(s["last_wake_secs"]),
            "last_sleep_secs": -1 if s["last_sleep_secs"] is None else pytest.approx(s["last_sleep_secs"]),
            "last_wake_kind": s["last_wake_kind"] or "", "last_error": s["last_error"] or "",
        }


# -- tests ---------------------------------------------------------------------------------------
def test_wake_sleep_inspect_properties_and_signals(daemon, buses, tmp_path):
    bus = buses["strict"]
    active, models = inspect(bus)
    assert active == "" and {n: m["state"] for n, m in models.items()} == {"m1": "stopped", "m2": "stopped"}
    assert models["m1"]["last_wake_secs"] == -1 and models["m1"]["last_wake_kind"] == ""
    assert get_property(bus, "Models") == 'as 2 "m1" "m2"'
    monitor = Monitor(bus, tmp_path)
    try:
        r = call(bus, "Wake", "s", "m1")
        assert r.returncode == 0, r.stderr
        state, secs = parse_sd(r.stdout)
        st = daemon.status()
        assert state == "awake" == st["models"]["m1"]["state"] and secs > 0 and st["active_model"] == "m1"
        assert secs == pytest.approx(st["models"]["m1"]["last_wake_secs"], abs=0.05)
        assert get_property(bus, "ActiveModel") == 's "m1"'
        assert get_property(bus, "Switching") == 's ""' and get_property(bus, "QueueDepth") == "u 0"
        text = call(bus, "Inspect").stdout  # what a person sees
        assert text.startswith('sa(ssaussddss) "m1" 2 "m1" "awake" ') and '"cold_start" ""' in text
        assert_inspect_agrees(inspect(bus), daemon.status())

        r = call(bus, "Wake", "s", "m2")  # evicts m1 (offload + keep_running: asleep)
        assert r.returncode == 0 and parse_sd(r.stdout)[0] == "awake", r.stderr
        st = daemon.status()
        assert st["active_model"] == "m2" and st["models"]["m1"]["state"] == "asleep" and st["models"]["m1"]["pids"]
        assert_inspect_agrees(inspect(bus), st)

        r = call(bus, "Sleep", "s", "m2")
        assert r.returncode == 0, r.stderr
        state, secs = parse_sd(r.stdout)
        st = daemon.status()
        assert state == "asleep" == st["models"]["m2"]["state"] and secs > 0 and st["active_model"] is None
        assert secs == pytest.approx(st["models"]["m2"]["last_sleep_secs"], abs=0.05)
        inspected = inspect(bus)
        assert inspected[0] == "" and inspected[1]["m2"]["last_sleep_secs"] > 0
        assert_inspect_agrees(inspected, st)
        assert get_property(bus, "ActiveModel") == 's ""'
        # Sleeping a model that is not awake is a no-op that says where it is.
        assert parse_sd(call(bus, "Sleep", "s", "m2").stdout) == ("asleep", 0.0)

        def all_seen():
            msgs = monitor.messages()
            return sum(m["member"] == "ModelStateChanged" for m in msgs) >= 8 and sum(
                "ActiveModel" in m["payload"]["data"][1] for m in msgs if m["member"] == "PropertiesChanged") >= 4

        wait_until(all_seen, 5, what="the signals in busctl monitor")
    finally:
        monitor.stop()
    msgs = monitor.messages()
    assert all(m["path"] == OBJECT_PATH for m in msgs)
    changes = [tuple(m["payload"]["data"]) for m in msgs if m["member"] == "ModelStateChanged"]
    assert all(m["interface"] == INTERFACE and m["payload"]["type"] == "sss"
               for m in msgs if m["member"] == "ModelStateChanged")
    assert changes == [
        ("m1", "stopped", "starting"), ("m1", "starting", "awake"),
        ("m1", "awake", "sleeping"), ("m1", "sleeping", "asleep"),
        ("m2", "stopped", "starting"), ("m2", "starting", "awake"),
        ("m2", "awake", "sleeping"), ("m2", "sleeping", "asleep"),
    ]
    props = [m["payload"]["data"] for m in msgs if m["member"] == "PropertiesChanged"]
    assert props and all(p[0] == INTERFACE and p[2] == [] for p in props)
    active_seq = [p[1]["ActiveModel"]["data"] for p in props if "ActiveModel" in p[1]]
    switching_seq = [p[1]["Switching"]["data"] for p in props if "Switching" in p[1]]
    assert active_seq == ["m1", "", "m2", ""]
    assert switching_seq == ["->m1", "", "m1->m2", ""]


def test_introspect(daemon, buses):
    r = busctl(buses["strict"], "introspect", BUS_NAME, OBJECT_PATH, INTERFACE)
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line.split()[1:] for line in r.stdout.splitlines()[1:] if line.strip()}
    assert rows[".Wake"][:3] == ["method", "s", "sd"]
    assert rows[".Sleep"][:3] == ["method", "s", "sd"]
    assert rows[".Inspect"][:3] == ["method", "-", "sa(ssaussddss)"]
    assert rows[".Reload"][:3] == ["method", "-", "asasasasas"]
    assert rows[".ModelStateChanged"][:2] == ["signal", "sss"]
    assert rows[".ActiveModel"][:2] == ["property", "s"] and "emits-change" in rows[".ActiveModel"]
    assert rows[".Models"][:2] == ["property", "as"] and "emits-change" in rows[".Models"]  # a reload changes it
    assert rows[".Switching"][:2] == ["property", "s"] and rows[".QueueDepth"][:2] == ["property", "u"]
    assert rows[".Progress"][:2] == ["property", "a(sssddsdd)"]
    assert not any("writable" in v for v in rows.values())


def test_progress_property_shows_the_transition_in_progress(daemon, buses):
    bus = buses["strict"]
    assert get_property(bus, "Progress", nobody=True) == "a(sssddsdd) 0"
    m2 = daemon.status()["models"]["m2"]
    if m2["pid"] is not None:  # its next wake must be a cold start, which can be held: end its tree
        os.kill(m2["pid"], signal.SIGKILL)
        wait_until(lambda: daemon.status()["models"]["m2"]["state"] == "stopped", 30, what="m2 stopped")
    daemon.holds.hold("m2")
    woken: list = []
    t = threading.Thread(target=lambda: woken.append(call(bus, "Wake", "s", "m2")))
    t.start()
    try:
        def in_load():
            st = daemon.status()["models"]["m2"]["progress"]
            return st if st and st["step"] == "load" else None

        wait_until(in_load, 30, what="m2's cold start held in its load step")
        r = busctl(bus, "get-property", BUS_NAME, OBJECT_PATH, INTERFACE, "Progress", json_out=True, nobody=True)
        assert r.returncode == 0, r.stderr
        reply = json.loads(r.stdout)
        assert reply["type"] == "a(sssddsdd)" and len(reply["data"]) == 1
        model, phase, kind, elapsed, typical, step, step_elapsed, step_typical = reply["data"][0]
        assert (model, phase, kind, step) == ("m2", "wake", "cold_start", "load") and elapsed >= step_elapsed > 0
        later = in_load()  # the same figures in /control/status, read later
        assert elapsed <= later["elapsed_secs"] and step_elapsed <= later["step_elapsed_secs"]
        for got, want in ((typical, later["typical_secs"]), (step_typical, later["step_typical_secs"])):
            assert got == (-1 if want is None else pytest.approx(want))
    finally:
        daemon.holds.release("m2")
        t.join(60)
    assert woken[0].returncode == 0, woken[0].stderr
    assert get_property(bus, "Progress") == "a(sssddsdd) 0"


def test_unknown_model_and_other_errors(daemon, buses):
    bus = buses["strict"]
    for member in ("Wake", "Sleep"):
        r = call(bus, member, "s", "ghost")
        assert r.returncode != 0 and "The model 'ghost' does not exist. Known models: m1, m2" in r.stderr, r.stderr
        r = dbus_send(bus, member, "string:ghost")  # dbus-send prints the error's name
        assert r.returncode != 0
        assert f"Error {ERROR_PREFIX}UnknownModel: The model 'ghost' does not exist" in r.stderr, r.stderr
    # The one mapping, for every domain error (the HTTP API maps the same classes).
    for exc, name in [
        (UnknownModel("x", ["m1"]), "UnknownModel"), (SwitchFailed("s"), "SwitchFailed"),
        (QueueTimeout("q"), "QueueTimeout"), (ShuttingDown("d"), "ShuttingDown"),
        (NotSupported("n"), "NotSupported"), (TransitionFailed("t"), "TransitionFailed"),
        (BadRequest("b"), "BadRequest"), (BackendDied("died"), "BackendDied"), (RuntimeError("boom"), "Failed"),
    ]:
        err = to_dbus_error(exc)
        assert err.type == ERROR_PREFIX + name and err.text.endswith(str(exc))


def as_user(uid: int) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_policy_non_root(daemon, buses, caplog):
    """Others may look, not touch, on every bus: on the two with our policy file the bus refuses
    them; on the permissive one (anyone may call anything there) llmuxd's own uid check does."""
    # root may change state, on every bus (one controller, several transports)
    r = call(buses["permissive"], "Wake", "s", "m1")
    assert r.returncode == 0 and parse_sd(r.stdout)[0] == "awake", r.stderr
    before = daemon.status()
    assert before["active_model"] == "m1" and before["models"]["m2"]["state"] != "awake"
    caplog.set_level("WARNING", logger="llmuxd.api.dbus")
    for name, bus in buses.items():
        assert_inspect_agrees(inspect(bus, nobody=True), before)
        assert get_property(bus, "ActiveModel", nobody=True) == 's "m1"'
        assert get_property(bus, "Models", nobody=True) == 'as 2 "m1" "m2"'
        r = busctl(bus, "introspect", BUS_NAME, OBJECT_PATH, nobody=True)
        assert r.returncode == 0 and ".Wake" in r.stdout, r.stderr
        for member, model in (("Wake", "m2"), ("Sleep", "m1"), ("StartWake", "m2"), ("StartSleep", "m1")):
            r = call(bus, member, "s", model, nobody=True)
            assert r.returncode != 0, (name, r.stdout)
            r = dbus_send(bus, member, f"string:{model}", nobody=True)
            assert r.returncode != 0 and "Error org.freedesktop.DBus.Error.AccessDenied" in r.stderr, (name, r.stderr)
            if name == "permissive":  # refused by llmuxd, which says why
                assert (f"{member} changes llmuxd's state: only uid 0 may call it; the caller is uid 65534"
                        in r.stderr), r.stderr
        r = busctl(bus, "set-property", BUS_NAME, OBJECT_PATH, INTERFACE, "ActiveModel", "s", "m2", nobody=True)
        assert r.returncode != 0
    after = daemon.status()
    assert after["active_model"] == "m1"
    assert {n: m["state"] for n, m in after["models"].items()} == {n: m["state"] for n, m in before["models"].items()}
    assert {n: m["pids"] for n, m in after["models"].items()} == {n: m["pids"] for n, m in before["models"].items()}
    refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("D-Bus: refused ")]
    assert len(refused) == 8 and all(m.endswith(": the caller is uid 65534") for m in refused), refused
    # ... and root still may, on the permissive bus too
    r = call(buses["permissive"], "Sleep", "s", "m1")
    assert r.returncode == 0 and parse_sd(r.stdout)[0] == "asleep", r.stderr
    assert daemon.status()["active_model"] is None


STUB_DAEMON = """
import asyncio, sys
from llmuxd.api.dbus import DbusTransport
from llmuxd.status import Transition

class Switcher:  # what the transport needs of one
    active = None; switching = None; models = {}
    def add_listener(self, listener): pass
    async def wake(self, model): return Transition(model=model, state="awake", duration_secs=0.5)
    async def sleep(self, model): return Transition(model=model, state="asleep", duration_secs=0.25)

async def main():
    await DbusTransport(Switcher(), sys.argv[1]).start()
    print("ready", flush=True)
    await asyncio.sleep(120)

asyncio.run(main())
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_uid_check_allows_root_and_llmuxd_own_user():
    """llmuxd running as uid 65534 on a permissive bus: its own user and root may call Wake and
    Sleep, uid 1 (daemon) may not; an unknown peer (no uid, as on a bus over TCP) is never tested
    here, the check refuses it the same way (see Llmuxd1._check_caller)."""
    folder = Path(tempfile.mkdtemp(prefix="llmuxd-dbus-own-"))
    folder.chmod(0o755)
    bus = Bus(folder, "own", allow_method_calls=True, our_policy=False)
    proc = subprocess.Popen([*as_user(65534), sys.executable, "-c", STUB_DAEMON, bus.address], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "ready", line + proc.stderr.read() if proc.poll() is not None else line
        for uid, ok in ((65534, True), (0, True), (1, False)):
            for member, state in (("Wake", "awake"), ("Sleep", "asleep")):
                argv = ["busctl", f"--address={bus.address}", "--timeout=30", "call", BUS_NAME, OBJECT_PATH,
                        INTERFACE, member, "s", "m1"]
                r = subprocess.run([*as_user(uid), *argv] if uid else argv, capture_output=True, text=True,
                                   timeout=40)
                if ok:
                    assert r.returncode == 0 and parse_sd(r.stdout)[0] == state, (uid, r.stderr)
                else:  # busctl says "Access denied"; dbus-send prints the error's name and message
                    assert r.returncode != 0 and "Access denied" in r.stderr, (uid, r.stdout, r.stderr)
                    r = subprocess.run([*as_user(uid), "dbus-send", f"--bus={bus.address}", "--print-reply",
                                        f"--dest={BUS_NAME}", OBJECT_PATH, f"{INTERFACE}.{member}", "string:m1"],
                                       capture_output=True, text=True, timeout=40)
                    assert r.returncode != 0 and (
                        f"Error org.freedesktop.DBus.Error.AccessDenied: {member} changes llmuxd's state: only uid 0 "
                        f"and uid 65534 may call it; the caller is uid {uid}") in r.stderr, r.stderr
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()
        bus.kill()
        shutil.rmtree(folder, ignore_errors=True)


def test_start_errors(daemon, buses, tmp_path):
    other = DbusTransport(daemon.switcher, buses["strict"].address)
    with pytest.raises(DbusStartError, match="already owned by another connection"):
        daemon.run(other.start())
    daemon.run(other.stop())
    missing = DbusTransport(daemon.switcher, f"unix:path={tmp_path}/no-such-bus")
    with pytest.raises(DbusStartError, match="cannot connect to the bus at unix:path="):
        daemon.run(missing.start())
    with pytest.raises(DbusStartError, match="expected 'system', 'session' or an address"):
        daemon.run(DbusTransport(daemon.switcher, "sytem").start())
    if os.geteuid() == 0:  # the policy: only root may own the name
        code = ("import asyncio, sys\nfrom llmuxd.api.dbus import DbusTransport, DbusStartError\n"
                "class S: active = None; switching = None; models = {}\n"
                "try: asyncio.run(DbusTransport(S(), sys.argv[1]).start())\n"
                "except DbusStartError as e: print(e); sys.exit(3)\n")
        for bus in (buses["strict"], buses["open"]):  # (the permissive bus lets anyone own anything)
            r = subprocess.run([*NOBODY, sys.executable, "-c", code, bus.address], capture_output=True, text=True,
                               timeout=30, cwd=REPO)
            assert r.returncode == 3, r.stdout + r.stderr
            assert f"cannot own {BUS_NAME} on the bus at {bus.address}" in r.stdout and "only root" in r.stdout
    # the running transport is unaffected
    assert get_property(buses["strict"], "Models") == 'as 2 "m1" "m2"'
