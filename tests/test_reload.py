"""Reloading the configuration without a restart: real daemons on real ports with simulator
backends, reloaded by SIGHUP, ``llmuxd reload`` (the CLI), ``POST /control/reload`` and D-Bus
``Reload``, under real clients (the official ``openai`` client, httpx, busctl).  The plan
itself (what a new file changes) is checked on configs alone first."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
from pathlib import Path

import httpx
import pytest

from conftest import model_entry
from harness import LLMUXD, free_port, free_ports, greedy_completion, run_clients, wait_until
from llmuxd.config import ConfigError, parse_config
from llmuxd.reload import ConfigSource, plan


# -- the plan, on configs alone -------------------------------------------------------------------
def _cfg(**top) -> dict:
    base = {"models": {"m1": model_entry("m1", 8101), "m2": model_entry("m2", 8102),
                       "m3": {"model_path": "x/y", "port": 8103}},
            "port": 3000, "policy": {"min_active_secs": 1}}
    return {**base, **top}


def _source(tmp_path: Path, data: dict, overrides: dict | None = None) -> ConfigSource:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return ConfigSource(path, overrides or {})


def test_plan_sorts_models_and_settings(tmp_path):
    running = parse_config(_cfg())
    new = _cfg(port=3001, max_request_bytes=1024, policy={"min_active_secs": 2})
    new["models"] = {"m1": model_entry("m1", 8101), "m2": model_entry("m2", 8102, extra=["--x"]),
                     "m4": {"model_path": "x/z", "port": 8104}}
    read = _source(tmp_path, new).read(running)
    assert read.held == ["max_request_bytes", "port"]
    assert read.config.port == 3000 and read.config.max_request_bytes == running.max_request_bytes
    p = plan(running, read.config)
    assert (p.added, p.removed, p.unchanged) == (["m4"], ["m3"], ["m1"])
    assert p.changed == {"m2": ["extra_args"]} and p.applied == ["policy.min_active_secs"]


def test_plan_follows_effective_settings(tmp_path):
    """A model is changed by what reaches its process or its eviction, wherever it is set: the
    policy's default eviction changes the models that have none of their own; vllm_command
    changes every model."""
    running = parse_config(_cfg())
    p = plan(running, parse_config(_cfg(policy={"min_active_secs": 1, "eviction": {"weights": "discard",
                                                                                  "process": "stop"}})))
    assert p.changed == {"m3": ["eviction"]} and p.unchanged == ["m1", "m2"]
    p = plan(running, parse_config(_cfg(vllm_command="other-vllm")))
    assert p.changed == {m: ["vllm_command"] for m in ("m1", "m2", "m3")} and p.applied == ["vllm_command"]


def test_settings_kept_at_their_running_value_are_checked_with_the_new_file(tmp_path):
    """The new file moves llmuxd's port and gives a model the old one: valid on its own, but port
    needs a restart and keeps its running value, which the model would then clash with."""
    running = parse_config(_cfg())
    new = _cfg(port=3001)
    new["models"]["m3"]["port"] = 3000
    with pytest.raises(ConfigError) as e:
        _source(tmp_path, new).read(running)
    assert "port as running" in e.value.path and "models.m3.port: 3000 is llmuxd's own port" in e.value.problems


def test_command_line_settings_win_over_the_file(tmp_path):
    """`llmuxd serve --port` ran with 5000: a file saying 3000 changes nothing."""
    running = parse_config({**_cfg(), "port": 5000})
    read = _source(tmp_path, _cfg(), {"port": 5000}).read(running)
    assert read.held == [] and read.config.port == 5000


# -- real daemons -----------------------------------------------------------------------------------
def rewrite(d, change) -> None:
    """Write the daemon's config file anew, as ``change(config)`` leaves it."""
    config = copy.deepcopy(d.config)
    change(config)
    d.config = config
    d.config_path.write_text(json.dumps(config, indent=2))


def reloads(d, result: str = "ok") -> int:
    text = httpx.get(d.url + "/metrics", timeout=10).text
    m = re.search(rf'^llmuxd_config_reloads_total{{result="{result}"}} (\S+)$', text, re.M)
    return int(float(m.group(1))) if m else 0


def sighup(d, result: str = "ok") -> None:
    """SIGHUP, then wait until the reload it asked for has ended with ``result``."""
    before = reloads(d, result)
    os.kill(d.proc.pid, signal.SIGHUP)
    wait_until(lambda: reloads(d, result) > before, 60, what=f"a reload ending {result}")


def reload_http(d) -> httpx.Response:
    return httpx.post(d.control_url + "/control/reload", timeout=120)


def complete(d, model: str, prompt: str = "hi", max_tokens: int = 4) -> httpx.Response:
    return httpx.post(d.url + "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                       "temperature": 0}, timeout=120)


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().rstrip("\0").split("\0")


def alive(pid: int) -> bool:
    from llmuxd.isolation.procfs import stat

    st = stat(pid)
    return st is not None and not st.zombie


class NotifySocket:
    """A service manager's notification socket: what llmuxd sends with sd_notify."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[list[str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append(self.sock.recv(65536).decode().split("\n"))
            except socket.timeout:
                continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        self.path.unlink(missing_ok=True)


def run_load(url: str, model: str, clients: int, stop: threading.Event, results: list, errors: list) -> None:
    """``clients`` official-openai clients asking ``model`` one request after another until
    ``stop``; odd clients stream."""

    async def client(i: int, api) -> None:
        n = 0
        while not stop.is_set():
            prompt = f"client {i} request {n}"
            results.append((prompt, await greedy_completion(api, model, prompt, 6, bool(i % 2))))
            n += 1

    errors.extend(run_clients(url, clients, client))


def test_sighup_under_load_keeps_the_unchanged_model_serving(make_daemon, expected, tmp_path):
    """Four clients (two streaming) keep asking m1 while SIGHUP reloads a config that adds m3
    and changes the policy: no request fails, every answer is m1's own, m1 keeps its backend
    process; m3 is there, stopped, and once started its output is forwarded like the others'.
    systemd's protocol: RELOADING=1 with MONOTONIC_USEC, then READY=1."""
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        d = make_daemon(env={"NOTIFY_SOCKET": str(notify.path)})
        assert complete(d, "m1").status_code == 200
        pid = d.status()["models"]["m1"]["pid"]
        stop, results, errors = threading.Event(), [], []
        load = threading.Thread(target=run_load, args=(d.url, "m1", 4, stop, results, errors))
        load.start()
        try:
            wait_until(lambda: len(results) >= 8 or errors, 60, what="the load to run")
            m3_port = free_port()
            rewrite(d, lambda c: (c["models"].update(m3=model_entry("m3", m3_port)),
                                  c["policy"].update(request_timeout_secs=90)))
            sighup(d)
            served = len(results)
            wait_until(lambda: len(results) >= served + 8 or errors, 60, what="the load to go on")
        finally:
            stop.set()
            load.join(120)
        assert not errors, errors
        assert results and all(text == expected("m1", prompt, 6) for prompt, text in results)
        st = d.status()
        assert st["models"]["m1"]["pid"] == pid and st["models"]["m1"]["state"] == "awake"
        assert st["models"]["m3"]["state"] == "stopped" and st["active_model"] == "m1"
        assert [m["id"] for m in httpx.get(d.url + "/v1/models").json()["data"]] == ["m1", "m2", "m3"]
        assert complete(d, "m3", "p").json()["choices"][0]["text"] == expected("m1", "p", 4)  # m3 is m1's weights
        wait_until(lambda: "[m3] " in d.log(), 30, what="m3's output forwarded with its name")
        assert "reloaded" in d.log() and "added m3; unchanged m1, m2; applied policy.request_timeout_secs" in d.log()
        lines = [line for msg in notify.messages for line in msg]
        reloading = lines.index("RELOADING=1")
        assert re.fullmatch(r"MONOTONIC_USEC=\d+", lines[reloading + 1]), lines[reloading:]
        assert "READY=1" in lines[reloading:]
    finally:
        notify.close()


def _slow(port: int, model: str = "m2") -> dict:
    return model_entry(model, port, extra=["--sim-token-delay", "0.05"])


def _stream(url: str, model: str, max_tokens: int, out: dict, started: threading.Event) -> None:
    """One streamed completion: ``out`` gets its text, or the error frame, and whether it closed."""
    text, body = [], {"model": model, "prompt": "long", "max_tokens": max_tokens, "temperature": 0, "stream": True}
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            out["status"] = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    frame = json.loads(line[6:])
                    if "error" in frame:
                        out["error"] = frame["error"]
                    else:
                        text.append(frame["choices"][0]["text"])
                        started.set()
                    if out.get("stop"):
                        return  # the client goes away
            out["done"] = True
    finally:
        out["text"] = "".join(text)
        started.set()


CRIU = {"criu_path": "/usr/local/bin/criu"}


@pytest.mark.criu
def test_removed_model_drains_then_stops_and_leaves_its_checkpoint(make_daemon, expected, tmp_path):
    """A reload (control API) that removes m2 while m2 streams: the stream ends normally, new
    requests for m2 get 404 at once, then m2's tree is stopped; the checkpoint a sleep wrote for
    m2 stays on disk."""
    p = free_ports(2)
    d = make_daemon(models={"m1": model_entry("m1", p[0]),
                            "m2": model_entry("m2", p[1], weights="discard", process="checkpoint",
                                              extra=["--sim-token-delay", "0.05"])},
                    checkpoint={**CRIU, "images_dir": str(tmp_path / "ck")}, policy={"drain_timeout_secs": 120})
    assert complete(d, "m2").status_code == 200
    assert d.control("sleep", "m2").json()["state"] == "checkpointed"
    images = Path(d.status()["models"]["m2"]["checkpoint_path"])
    assert (images / "manifest.json").is_file()
    assert complete(d, "m2").status_code == 200  # restored
    pids = d.status()["models"]["m2"]["pids"]
    out, started = {}, threading.Event()
    stream = threading.Thread(target=_stream, args=(d.url, "m2", 100, out, started))
    stream.start()
    started.wait(60)
    rewrite(d, lambda c: c["models"].pop("m2"))
    reply: dict = {}
    reloading = threading.Thread(target=lambda: reply.update(r=reload_http(d)))
    reloading.start()
    # m2 is out of service at once, while its stream goes on.
    wait_until(lambda: complete(d, "m2").status_code == 404, 60, what="m2 refused")
    r = complete(d, "m2")
    assert r.json()["error"]["code"] == "model_not_found", r.text
    assert stream.is_alive(), "the stream ended before the reload took m2 out of service: nothing drained"
    stream.join(120)
    reloading.join(120)
    assert out.get("done") and "error" not in out, out
    assert out["text"] == expected("m2", "long", 100)
    r = reply["r"]
    assert r.status_code == 200, r.text
    assert r.json()["removed"] == ["m2"] and r.json()["unchanged"] == ["m1"]
    assert not any(alive(pid) for pid in pids)
    assert "m2" not in d.status()["models"] and [m["id"] for m in httpx.get(d.url + "/v1/models").json()["data"]] == ["m1"]
    assert (images / "manifest.json").is_file()  # left on disk
    assert complete(d, "m1").status_code == 200


def test_requests_waiting_for_a_removed_model_fail_clearly(make_daemon, expected):
    """m2 streams (held open by its client); a request for m1 makes the switcher drain m2; a
    reload removing m2 is queued behind that switch; then a request for m2 waits (m2 is being
    evicted).  Once the stream's client goes away, the switch ends, then the reload: the waiting
    request gets 404 model_removed; the one for m1 is served; m2's tree is stopped."""
    p = free_ports(2)
    d = make_daemon(models={"m1": model_entry("m1", p[0]), "m2": _slow(p[1])}, policy={"drain_timeout_secs": 120})
    assert complete(d, "m2").status_code == 200
    pids = d.status()["models"]["m2"]["pids"]
    held, started = {}, threading.Event()
    stream = threading.Thread(target=_stream, args=(d.url, "m2", 100000, held, started))
    stream.start()
    started.wait(60)
    replies: dict = {}

    def ask(key, fn):
        t = threading.Thread(target=lambda: replies.update({key: fn()}))
        t.start()
        return t

    threads = [ask("m1", lambda: complete(d, "m1", "x"))]
    wait_until(lambda: (d.status().get("switching") or {}).get("to") == "m1", 60, what="the switch to m1")
    rewrite(d, lambda c: c["models"].pop("m2"))
    threads.append(ask("reload", lambda: reload_http(d)))
    wait_until(lambda: "reload of" in d.log(), 60, what="the reload to be queued")
    threads.append(ask("m2", lambda: complete(d, "m2", "y")))
    wait_until(lambda: d.status()["models"]["m2"]["waiting"] == 1, 60, what="the request for m2 to wait")
    held["stop"] = True  # the stream's client goes away at its next frame
    for t in [stream, *threads]:
        t.join(120)
    r = replies["m2"]
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_removed", r.text
    assert "removed from the configuration" in r.json()["error"]["message"]
    assert replies["m1"].json()["choices"][0]["text"] == expected("m1", "x", 4)
    assert replies["reload"].json()["removed"] == ["m2"]
    assert not any(alive(pid) for pid in pids)
    assert complete(d, "m2").json()["error"]["code"] == "model_not_found"


def test_changed_models_restart_when_next_needed(make_daemon, expected):
    """`llmuxd reload` with new extra_args for m1 (awake) and m2 (asleep, its process alive):
    m2's process is stopped by the reload; m1 keeps serving from the same process, marked
    restart pending, until its next eviction, which stops it; each then cold-starts with the new
    setting (a new process whose command line has it)."""
    d = make_daemon()
    assert complete(d, "m2").status_code == 200
    assert complete(d, "m1").status_code == 200
    st = d.status()["models"]
    assert st["m2"]["state"] == "asleep"
    m1_pid, m2_pids = st["m1"]["pid"], st["m2"]["pids"]
    flag = ["--sim-token-delay", "0.002"]
    rewrite(d, lambda c: [c["models"][m]["extra_args"].extend(flag) for m in ("m1", "m2")])
    r = subprocess.run([LLMUXD, "reload", "--url", d.control_url, "--json"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["changed"] == {"m1": ["extra_args"], "m2": ["extra_args"]} and result["restart_pending"] == ["m1"]
    st = d.status()["models"]
    assert st["m2"]["state"] == "stopped" and not any(alive(p) for p in m2_pids)
    assert st["m1"]["pid"] == m1_pid and st["m1"]["state"] == "awake" and st["m1"]["restart_pending"]
    assert complete(d, "m1", "a").json()["choices"][0]["text"] == expected("m1", "a", 4)
    assert d.status()["models"]["m1"]["pid"] == m1_pid  # the old process still serves
    # Changed back before it was applied: nothing is pending any more; changed again: it is.
    rewrite(d, lambda c: c["models"]["m1"].update(extra_args=[]))
    r = reload_http(d).json()
    assert r["unchanged"] == ["m1", "m2"] and r["restart_pending"] == [] and r["changed"] == {}
    assert not d.status()["models"]["m1"]["restart_pending"]
    rewrite(d, lambda c: c["models"]["m1"]["extra_args"].extend(flag))
    assert reload_http(d).json()["restart_pending"] == ["m1"]
    # m2 is needed: m1's eviction stops it (not asleep), m2 starts with the new setting.
    assert complete(d, "m2", "b").json()["choices"][0]["text"] == expected("m2", "b", 4)
    st = d.status()["models"]
    assert st["m1"]["state"] == "stopped" and not alive(m1_pid) and not st["m1"]["restart_pending"]
    assert cmdline(st["m2"]["pid"])[-2:] == flag and st["m2"]["last_wake_kind"] == "cold_start"
    assert complete(d, "m1", "c").json()["choices"][0]["text"] == expected("m1", "c", 4)
    st = d.status()["models"]["m1"]
    assert st["pid"] != m1_pid and cmdline(st["pid"])[-2:] == flag and st["last_wake_kind"] == "cold_start"
    # The CLI's own words; nothing changed now.
    r = subprocess.run([LLMUXD, "reload", "--url", d.control_url], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith(f"reloaded {d.config_path} in ")
    assert r.stdout.rstrip().endswith(" s: unchanged m1, m2"), r.stdout


@pytest.mark.criu
def test_changed_checkpoint_model_is_not_restored_with_its_old_command_line(make_daemon, expected, tmp_path):
    """A checkpointed model whose extra_args change: its checkpoint holds the old command line, so
    its next wake cold-starts with the new one (the checkpoint stays until the next dump replaces
    it).  A change that leaves the command line as it was (the eviction's process axis) keeps the
    checkpoint in use."""
    p = free_ports(2)
    d = make_daemon(models={"m1": model_entry("m1", p[0], weights="discard", process="checkpoint"),
                            "m2": model_entry("m2", p[1])}, checkpoint={**CRIU, "images_dir": str(tmp_path / "ck")})
    assert complete(d, "m1").status_code == 200
    assert d.control("sleep", "m1").json()["state"] == "checkpointed"
    rewrite(d, lambda c: c["models"]["m1"]["eviction"].update(process="stop"))
    assert reload_http(d).json()["changed"] == {"m1": ["eviction"]}
    assert d.status()["models"]["m1"]["state"] == "checkpointed"
    rewrite(d, lambda c: c["models"]["m1"].update(extra_args=["--sim-token-delay", "0.002"],
                                                  eviction={"weights": "discard", "process": "checkpoint"}))
    assert reload_http(d).json()["changed"] == {"m1": ["eviction", "extra_args"]}
    st = d.status()["models"]["m1"]
    assert st["state"] == "stopped" and st["restore_failures"] == 0
    assert "made with another command line" in d.log()
    assert complete(d, "m1", "q").json()["choices"][0]["text"] == expected("m1", "q", 4)
    st = d.status()["models"]["m1"]
    assert st["last_wake_kind"] == "cold_start" and cmdline(st["pid"])[-1] == "0.002"
    assert d.control("sleep", "m1").json()["state"] == "checkpointed"  # a new dump, with the new command line
    assert complete(d, "m1", "q").json()["choices"][0]["text"] == expected("m1", "q", 4)
    assert d.status()["models"]["m1"]["last_wake_kind"] == "restore"


def test_invalid_config_is_refused_and_the_old_one_serves(make_daemon, expected):
    """A broken file: the reload is refused with every reason, as check-config gives them (HTTP
    422, SIGHUP: in the log, the CLI: on stderr), and the running configuration stays in force."""
    d = make_daemon()
    assert complete(d, "m1").status_code == 200
    pid = d.status()["models"]["m1"]["pid"]
    rewrite(d, lambda c: (c["models"]["m2"].update(port=0), c.update(colour="blue")))
    check = subprocess.run([LLMUXD, "check-config", "--config", str(d.config_path)], capture_output=True, text=True)
    assert check.returncode == 2 and "models.m2.port" in check.stderr and "colour: unknown key" in check.stderr
    r = reload_http(d)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_config"
    rendering = check.stderr.strip().removeprefix("llmuxd: ")
    assert r.json()["error"]["message"] == rendering
    sighup(d, "refused")
    assert "reload refused, the running configuration stays in force" in d.log()
    cli = subprocess.run([LLMUXD, "reload", "--url", d.control_url, "--json"], capture_output=True, text=True,
                         timeout=60)
    assert cli.returncode == 2 and rendering in cli.stderr
    assert json.loads(cli.stdout)["error"]["code"] == "invalid_config"
    st = d.status()["models"]
    assert set(st) == {"m1", "m2"} and st["m1"]["pid"] == pid
    assert complete(d, "m1", "z").json()["choices"][0]["text"] == expected("m1", "z", 4)
    assert complete(d, "m2", "z").json()["choices"][0]["text"] == expected("m2", "z", 4)
    assert reloads(d, "ok") == 0 and reloads(d, "refused") == 3


def test_settings_that_need_a_restart_keep_their_value(make_daemon):
    """A new port and body limit are reported as needing a restart and not applied; the policy
    change next to them is."""
    d = make_daemon()
    old_port, new_port = d.port, free_port()
    rewrite(d, lambda c: (c.update(port=new_port, max_request_bytes=1000), c["policy"].update(min_active_secs=3)))
    r = reload_http(d)
    assert r.status_code == 200, r.text
    assert r.json()["needs_restart"] == ["max_request_bytes", "port"]
    assert r.json()["applied"] == ["policy.min_active_secs"]
    assert "needs a restart (old value kept) max_request_bytes, port" in d.log()
    assert httpx.get(f"http://127.0.0.1:{old_port}/health").status_code == 200
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{new_port}/health")
    big = "x" * 5000  # over the new limit, under the running one
    assert complete(d, "m1", big).status_code == 200


@pytest.mark.skipif(not (shutil.which("dbus-daemon") and shutil.which("busctl")), reason="needs dbus-daemon, busctl")
def test_reload_over_dbus(make_daemon, tmp_path):
    """D-Bus ``Reload`` on a private bus (no policy of ours: llmuxd's own caller check applies)."""
    from test_dbus import Bus

    bus = Bus(tmp_path, "reload", allow_method_calls=True, our_policy=False)
    try:
        d = make_daemon(start=False)
        d.serve_args = ["--dbus", bus.address]
        d.start()
        wait_until(lambda: "io.llmux.Llmuxd1" in subprocess.run(
            ["busctl", f"--address={bus.address}", "list", "--no-legend"], capture_output=True, text=True).stdout,
            30, what="llmuxd on the bus")
        call = ["busctl", f"--address={bus.address}", "--timeout=60", "call", "io.llmux.Llmuxd1", "/io/llmux/Llmuxd1",
                "io.llmux.Llmuxd1", "Reload"]
        port = free_port()
        rewrite(d, lambda c: (c["models"].pop("m2"), c["models"].update(m3=model_entry("m3", port))))
        r = subprocess.run(call, capture_output=True, text=True, timeout=70)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == 'asasasasas 1 "m3" 1 "m2" 0 1 "m1" 0'
        got = subprocess.run(["busctl", f"--address={bus.address}", "get-property", "io.llmux.Llmuxd1",
                              "/io/llmux/Llmuxd1", "io.llmux.Llmuxd1", "Models"], capture_output=True, text=True)
        assert got.stdout.strip() == 'as 2 "m1" "m3"'
        rewrite(d, lambda c: c.update(port="x"))
        r = subprocess.run(call, capture_output=True, text=True, timeout=70)
        assert r.returncode != 0 and "port" in r.stderr, r.stderr
        r = subprocess.run(["dbus-send", f"--bus={bus.address}", "--print-reply", "--dest=io.llmux.Llmuxd1",
                            "/io/llmux/Llmuxd1", "io.llmux.Llmuxd1.Reload"], capture_output=True, text=True)
        assert "io.llmux.Llmuxd1.Error.ConfigRefused" in r.stderr, r.stderr
    finally:
        d.stop()
        bus.kill()
