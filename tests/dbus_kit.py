"""D-Bus test kit: private dbus-daemons (with or without llmuxd's policy file), the transport
running in process over a real Switcher with simulator backends, and the real busctl /
dbus-send as clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import threading
from pathlib import Path
from typing import Iterator

import pytest

from harness import REPO, SIM, free_ports, terminate, wait_until
from llmuxd.api.dbus import BUS_NAME, INTERFACE, OBJECT_PATH, DbusTransport
from llmuxd.config import parse_config
from llmuxd.isolation import procfs
from llmuxd.switcher import Switcher

TOOLS = pytest.mark.skipif(
    not (shutil.which("dbus-daemon") and shutil.which("busctl") and shutil.which("dbus-send")),
    reason="needs dbus-daemon, busctl and dbus-send (apt package dbus)",
)

POLICY = REPO / "dbus" / "io.llmux.Llmuxd1.conf"
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <auth>EXTERNAL</auth>
  <listen>unix:path={socket}</listen>
  <policy context="default">
    <allow user="*"/>
    <{own} own="*"/>
    <{method_calls} send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"
          send_member="UpdateActivationEnvironment"/>
  </policy>
  <policy user="root">
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Monitoring"/>
  </policy>
  {include}
</busconfig>
"""


class Bus:
    """A private dbus-daemon, killed by its PID."""

    def __init__(self, folder: Path, name: str, allow_method_calls: bool, our_policy: bool = True):
        """``our_policy=False``: no llmuxd policy, anyone may own any name (a permissive bus)."""
        self.config = folder / f"{name}.conf"
        self.config.write_text(BUS_CONFIG.format(
            socket=folder / f"{name}.sock", method_calls="allow" if allow_method_calls else "deny",
            own="deny" if our_policy else "allow", include=f"<include>{POLICY}</include>" if our_policy else ""))
        self.log = open(folder / f"{name}.log", "wb")
        self.proc = subprocess.Popen(
            ["dbus-daemon", f"--config-file={self.config}", "--nofork", "--print-address=1"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.log, start_new_session=True,
        )
        line = self.proc.stdout.readline().decode().strip()
        if not line:
            self.kill()
            raise AssertionError(f"dbus-daemon did not start: {(folder / f'{name}.log').read_text()}")
        self.address = line.split(",guid=")[0]

    def kill(self) -> None:
        terminate(self.proc, 5)
        self.proc.stdout.close()
        self.log.close()


def busctl(bus: Bus, *args: str, nobody: bool = False, json_out: bool = False) -> subprocess.CompletedProcess:
    argv = ["busctl", f"--address={bus.address}", "--timeout=60", *(["--json=short"] if json_out else []), *args]
    return subprocess.run([*NOBODY, *argv] if nobody else argv, capture_output=True, text=True, timeout=70)


def call(bus: Bus, member: str, *args: str, **kw) -> subprocess.CompletedProcess:
    return busctl(bus, "call", BUS_NAME, OBJECT_PATH, INTERFACE, member, *args, **kw)


def dbus_send(bus: Bus, member: str, *args: str, nobody: bool = False) -> subprocess.CompletedProcess:
    argv = ["dbus-send", f"--bus={bus.address}", "--print-reply", "--reply-timeout=60000", f"--dest={BUS_NAME}",
            OBJECT_PATH, f"{INTERFACE}.{member}", *args]
    return subprocess.run([*NOBODY, *argv] if nobody else argv, capture_output=True, text=True, timeout=70)


class Daemon:
    """The Switcher and one DbusTransport per bus, on an asyncio loop in a background thread
    (the way ``llmuxd serve`` will run them, minus the HTTP side)."""

    def __init__(self, config: dict):
        self.config = parse_config(config)
        self.transports: list[DbusTransport] = []
        self.backend_pids: dict[int, int] = {}  # pid -> start time, so a reused PID is never killed
        self.switcher: Switcher | None = None
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="llmuxd-loop", daemon=True)
        self.thread.start()

    def start(self, buses: list[Bus]) -> None:
        async def start():
            self.switcher = Switcher(self.config)
            self.switcher.start()
            for bus in buses:
                t = DbusTransport(self.switcher, bus.address)
                self.transports.append(t)
                await t.start()

        self.run(start())

    def run(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @contextlib.contextmanager
    def request_in_flight(self, model: str) -> Iterator[None]:
        """A request being served by ``model`` (the lease the proxy holds for one), until the
        block ends: an eviction of ``model`` waits for it (the drain)."""
        admitted = threading.Event()
        release = self.run(self._event())

        async def serve():
            async with self.switcher.serving(model):
                admitted.set()
                await release.wait()

        done = asyncio.run_coroutine_threadsafe(serve(), self.loop)
        done.add_done_callback(lambda _: admitted.set())
        try:
            assert admitted.wait(60), "the request was not admitted"
            if done.done():
                done.result()  # raises what failed
            yield
        finally:
            self.loop.call_soon_threadsafe(release.set)
            done.result(60)

    @staticmethod
    async def _event() -> asyncio.Event:
        return asyncio.Event()

    def status(self) -> dict:
        async def get():
            return self.switcher.status().json_dict()

        st = self.run(get())
        for m in st["models"].values():
            for pid in m["pids"]:
                ps = procfs.stat(pid)
                if ps is not None:
                    self.backend_pids.setdefault(pid, ps.starttime)
        return st

    def close(self) -> None:
        async def stop():
            for t in self.transports:
                await t.stop()
            if self.switcher is not None:
                await self.switcher.close()

        try:
            if self.switcher is not None:
                self.status()
            self.run(stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            for pid, started in self.backend_pids.items():  # never leave a backend behind
                st = procfs.stat(pid)
                if st is not None and not st.zombie and st.starttime == started:
                    os.kill(pid, signal.SIGKILL)


class Monitor:
    """``busctl monitor`` of our object's signals, as JSON lines."""

    def __init__(self, bus: Bus, folder: Path, name: str = "monitor"):
        self.out = folder / f"{name}.jsonl"
        self.err = folder / f"{name}.err"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                ["busctl", f"--address={bus.address}", "monitor", "--json=short",
                 f"--match=type='signal',path='{OBJECT_PATH}'"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err,
            )
        wait_until(lambda: "Monitoring" in self.err.read_text() or self.proc.poll() is not None, 10,
                   what="busctl monitor")
        assert self.proc.poll() is None, self.err.read_text()

    def messages(self) -> list[dict]:
        return [json.loads(line) for line in self.out.read_text().splitlines() if line.strip()]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.wait(5)


def parse_sd(out: str) -> tuple[str, float]:
    m = re.fullmatch(r'sd "(\w+)" (\S+)\n?', out)
    assert m, out
    return m.group(1), float(m.group(2))


def get_property(bus: Bus, name: str, nobody: bool = False) -> str:
    r = busctl(bus, "get-property", BUS_NAME, OBJECT_PATH, INTERFACE, name, nobody=nobody)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()



@contextlib.contextmanager
def sim_daemon(buses: list[Bus], models: dict, hf_home: Path, tmp: Path, vllm_command: str = SIM,
               **policy) -> Iterator[Daemon]:
    """A Daemon over simulator backends (``models``: name -> config entry), on ``buses``;
    ``vllm_command``: the simulator, or a wrapper of it."""
    config = {
        "models": models, "port": free_ports(1)[0], "metrics_port": 0, "host": "127.0.0.1",
        "vllm_command": vllm_command,
        "log_dir": str(tmp / "logs"),
        "policy": {"request_timeout_secs": 60, "min_active_secs": 0, "startup_timeout_secs": 30, **policy},
    }
    (tmp / "home").mkdir()
    with pytest.MonkeyPatch.context() as mp:  # the backends inherit llmuxd's environment
        for k, v in {"HOME": str(tmp / "home"), "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1",
                     "LLMUXD_SIM_GPU_DIR": str(tmp / "gpu")}.items():
            mp.setenv(k, v)
        d = Daemon(config)
        try:
            d.start(buses)
            yield d
        finally:
            d.close()
