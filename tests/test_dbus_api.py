"""The D-Bus API as documented: ``dbus/io.llmux.Llmuxd1.xml`` against what a running llmuxd
exports (``busctl --xml-interface introspect``), and the jobs (``StartWake``/``StartSleep``,
``JobNew``/``JobRemoved``) driven by the real busctl on a private dbus-daemon with llmuxd's
policy (calls denied by default, as on the system bus)."""

from __future__ import annotations

import re
import shutil
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import model_entry
from dbus_kit import TOOLS, Bus, Monitor, busctl, call, dbus_send, get_property, parse_sd, sim_daemon
from harness import REPO, free_ports, wait_until
from llmuxd.api.dbus import BUS_NAME, ERROR_PREFIX, INTERFACE, JOB_INTERFACE, JOB_PATH, OBJECT_PATH

pytestmark = TOOLS

API_XML = REPO / "dbus" / "io.llmux.Llmuxd1.xml"


@pytest.fixture(scope="module")
def bus():
    folder = Path(tempfile.mkdtemp(prefix="llmuxd-dbus-api-"))
    b = Bus(folder, "bus", allow_method_calls=False)
    try:
        yield b
    finally:
        b.kill()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def daemon(bus, hf_home, tmp_path_factory):
    ports = free_ports(3)
    models = {"m1": model_entry("m1", ports[0]), "m2": model_entry("m2", ports[1]),
              # its server cannot start: the weights are not in the HF cache
              "broken": {**model_entry("m1", ports[2]), "model_path": "test-org/not-in-the-cache"}}
    with sim_daemon([bus], models, hf_home, tmp_path_factory.mktemp("dbus-api")) as d:
        yield d


# -- the interface file ----------------------------------------------------------------------------
def members(iface: ET.Element) -> dict:
    """An interface's methods, signals and properties, comparable: args in order with their
    names, types and directions (the defaults made explicit), annotations."""
    out = {}
    for el in iface:
        notes = {a.get("name"): a.get("value") for a in el.findall("annotation")}
        if el.tag == "property":
            out[("property", el.get("name"))] = (el.get("type"), el.get("access"), notes)
        elif el.tag in ("method", "signal"):
            default = "in" if el.tag == "method" else "out"
            args = [(a.get("name"), a.get("type"), a.get("direction", default)) for a in el.findall("arg")]
            out[(el.tag, el.get("name"))] = (args, notes)
    return out


def interfaces(xml: str) -> dict[str, dict]:
    return {i.get("name"): members(i) for i in ET.fromstring(xml).findall("interface")}


def exported(bus: Bus, path: str) -> dict[str, dict]:
    r = busctl(bus, "--xml-interface", "introspect", BUS_NAME, path)
    assert r.returncode == 0, r.stderr
    return interfaces(r.stdout)


def documented() -> dict[str, dict]:
    return interfaces(API_XML.read_text())


def test_interface_file_is_what_the_daemon_exports(daemon, bus):
    doc = documented()
    assert set(doc) == {INTERFACE, JOB_INTERFACE}
    live = exported(bus, OBJECT_PATH)
    assert live[INTERFACE] == doc[INTERFACE]
    assert set(live) - {INTERFACE} <= {"org.freedesktop.DBus.Introspectable", "org.freedesktop.DBus.Properties",
                                       "org.freedesktop.DBus.Peer", "org.freedesktop.DBus.ObjectManager"}
    assert ("method", "StartWake") in doc[INTERFACE] and ("signal", "JobRemoved") in doc[INTERFACE]
    # every member is documented (named in a comment)
    comments = " ".join(re.findall(r"<!--(.*?)-->", API_XML.read_text(), re.S))
    for iface in doc.values():
        for _, name in iface:
            assert re.search(rf"\b{name}\b", comments), name


# -- jobs ------------------------------------------------------------------------------------------
def job_path(out: str) -> str:
    m = re.fullmatch(r'o "(\S+)"\n?', out)
    assert m, out
    return m.group(1)


def job_property(bus: Bus, path: str, name: str) -> str:
    r = busctl(bus, "get-property", BUS_NAME, path, JOB_INTERFACE, name)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def signals(monitor: Monitor, member: str) -> list[list]:
    return [m["payload"]["data"] for m in monitor.messages() if m.get("member") == member]


def removed(monitor: Monitor, path: str) -> list:
    found = [s for s in signals(monitor, "JobRemoved") if s[1] == path]
    return found[0] if found else None


def test_start_wake_returns_a_job_at_once_and_signals_its_end(daemon, bus, tmp_path):
    monitor = Monitor(bus, tmp_path)
    try:
        assert parse_sd(call(bus, "Wake", "s", "m1").stdout)[0] == "awake"
        with daemon.request_in_flight("m1"):  # the switch to m2 waits for it (the drain)
            r = call(bus, "StartWake", "s", "m2")
            assert r.returncode == 0, r.stderr
            path = job_path(r.stdout)
            assert re.fullmatch(rf"{JOB_PATH}/\d+", path)
            job_id = int(path.rsplit("/", 1)[1])
            # the job is on the bus while it runs, with its interface as documented
            assert exported(bus, path)[JOB_INTERFACE] == documented()[JOB_INTERFACE]
            assert job_property(bus, path, "Model") == 's "m2"'
            assert job_property(bus, path, "JobType") == 's "wake"'
            assert job_property(bus, path, "Id") == f"u {job_id}"
            assert get_property(bus, "Switching") == 's "m1->m2"'
            assert daemon.status()["models"]["m2"]["state"] == "stopped"
            assert removed(monitor, path) is None
        wait_until(lambda: removed(monitor, path), 60, what="JobRemoved")
        assert removed(monitor, path) == [job_id, path, "m2", "done"]
        assert [job_id, path, "m2"] in signals(monitor, "JobNew")
        st = daemon.status()
        assert st["active_model"] == "m2" and st["models"]["m2"]["state"] == "awake"
        r = busctl(bus, "get-property", BUS_NAME, path, JOB_INTERFACE, "Model")
        assert r.returncode != 0  # the job is gone

        r = call(bus, "StartSleep", "s", "m2")
        assert r.returncode == 0, r.stderr
        path = job_path(r.stdout)
        wait_until(lambda: removed(monitor, path), 60, what="JobRemoved")
        assert removed(monitor, path)[2:] == ["m2", "done"]
        assert daemon.status()["models"]["m2"]["state"] == "asleep"
    finally:
        monitor.stop()
    # JobNew precedes JobRemoved for each job, and the ids grow
    order = [(m["member"], m["payload"]["data"][0]) for m in monitor.messages()
             if m.get("member") in ("JobNew", "JobRemoved")]
    ids = sorted({i for _, i in order})
    assert order == [(k, i) for i in ids for k in ("JobNew", "JobRemoved")]


def test_failing_jobs(daemon, bus, tmp_path):
    monitor = Monitor(bus, tmp_path)
    try:
        # an unknown model: an error at once, and no job
        r = busctl(bus, "call", BUS_NAME, OBJECT_PATH, INTERFACE, "StartWake", "s", "ghost")
        assert r.returncode != 0 and "The model 'ghost' does not exist" in r.stderr, r.stderr
        r = busctl(bus, "call", BUS_NAME, OBJECT_PATH, INTERFACE, "StartSleep", "s", "ghost")
        assert r.returncode != 0 and "The model 'ghost' does not exist" in r.stderr, r.stderr
        # a model whose server cannot start: a job whose result is "failed"
        r = call(bus, "StartWake", "s", "broken")
        assert r.returncode == 0, r.stderr
        path = job_path(r.stdout)
        wait_until(lambda: removed(monitor, path), 60, what="JobRemoved")
        assert removed(monitor, path)[2:] == ["broken", "failed"]
        st = daemon.status()["models"]["broken"]
        assert st["state"] == "stopped" and st["last_error"], st
    finally:
        monitor.stop()
    assert not [s for s in signals(monitor, "JobNew") if s[2] == "ghost"]
    # the blocking method tells the same failure as a named error
    r = dbus_send(bus, "Wake", "string:broken")
    assert r.returncode != 0 and f"Error {ERROR_PREFIX}SwitchFailed: " in r.stderr, r.stderr


def test_jobs_end_canceled_when_llmuxd_stops(hf_home, tmp_path):
    """llmuxd stops (its switcher closes before its D-Bus connection, as in ``serve``) while one
    job runs and another waits behind it: both end with "canceled"."""
    own = Bus(tmp_path, "own", allow_method_calls=False)
    ports = free_ports(2)
    models = {"m1": model_entry("m1", ports[0]), "m2": model_entry("m2", ports[1])}
    try:
        with sim_daemon([own], models, hf_home, tmp_path) as d:
            monitor = Monitor(own, tmp_path)
            try:
                assert parse_sd(call(own, "Wake", "s", "m1").stdout)[0] == "awake"
                with d.request_in_flight("m1"):  # the switch to m2 stays in its drain
                    running = job_path(call(own, "StartWake", "s", "m2").stdout)
                    waiting = job_path(call(own, "StartSleep", "s", "m1").stdout)
                    wait_until(lambda: get_property(own, "Switching") == 's "m1->m2"', 30, what="the switch")
                    d.run(d.switcher.close())
                    wait_until(lambda: removed(monitor, running) and removed(monitor, waiting), 30,
                               what="JobRemoved")
            finally:
                monitor.stop()
            assert removed(monitor, running)[2:] == ["m2", "canceled"]
            assert removed(monitor, waiting)[2:] == ["m1", "canceled"]
    finally:
        own.kill()
