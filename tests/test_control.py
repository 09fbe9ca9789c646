"""Control API, eviction policies, faults, metrics and the CLI against a real daemon."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading

import httpx
import pytest

from conftest import model_entry
from harness import LLMUXD, free_ports, wait_until
from llmuxd import modellog
from llmuxd.isolation.procfs import alive
from test_switching import GpuWatch, metric, two_models


def complete(d, model, prompt="hello", n=4, timeout=60) -> httpx.Response:
    return httpx.post(d.url + "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": n},
                      timeout=timeout)


def test_control_sleep_wake_status(make_daemon):
    d = make_daemon()
    r = d.control("wake", "m1")
    assert r.status_code == 200
    body = r.json()
    assert body["model"] == "m1" and body["state"] == "awake" and body["duration_secs"] > 0
    st = d.status()
    m1 = st["models"]["m1"]
    assert st["active_model"] == "m1" and st["queue_depth"] == 0 and st["switching"] is None
    assert m1["pids"] and all(alive(p) for p in m1["pids"]) and len(m1["pids"]) >= 2  # server + engine
    assert m1["eviction"] == {"weights": "offload", "process": "keep_running"} and m1["port"] > 0
    assert m1["last_wake_kind"] == "cold_start" and m1["last_wake_secs"] > 0 and m1["in_flight"] == 0
    r = d.control("sleep", "m1")
    assert r.status_code == 200 and r.json()["state"] == "asleep" and r.json()["duration_secs"] > 0
    st = d.status()
    assert st["active_model"] is None and st["models"]["m1"]["last_sleep_secs"] > 0
    assert st["models"]["m1"]["pids"]  # keep_running: the process stays
    r = d.control("wake", "m1")
    assert r.json()["state"] == "awake"
    assert d.status()["models"]["m1"]["last_wake_kind"] == "wake"
    # Sleeping a model that is not awake is a no-op with the state it has.
    assert d.control("sleep", "m2").json() | {"duration_secs": 0} == {
        "model": "m2", "state": "stopped", "duration_secs": 0, "last_error": None}
    for verb in ("wake", "sleep"):
        r = d.control(verb, "ghost")
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(d.url + "/control/wake", content=b"{")
    assert r.status_code == 400


def test_concurrent_control_calls_are_serialized(make_daemon, sim_env):
    d = make_daemon()

    async def go():
        async with httpx.AsyncClient(timeout=60) as c:
            calls = [("wake", "m1"), ("wake", "m2"), ("sleep", "m2"), ("wake", "m1"), ("wake", "m2")] * 2
            rs = await asyncio.gather(*(c.post(f"{d.url}/control/{v}", json={"model": m}) for v, m in calls),
                                      *(c.post(d.url + "/v1/completions", json={"model": m, "prompt": "x"})
                                        for m in ("m1", "m2", "m1")))
            return rs

    with GpuWatch(sim_env["LLMUXD_SIM_GPU_DIR"]) as gpu:
        rs = asyncio.run(go())
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200]
    assert gpu.max_leases <= 1
    awake = [n for n, m in d.status()["models"].items() if m["state"] == "awake"]
    assert len(awake) <= 1


def test_discard_wake_reloads_weights(make_daemon, expected):
    """discard = sleep level 2: a wake without reload_weights answers garbage; ours must not."""
    d = make_daemon(models=two_models("discard", "keep_running"))
    assert complete(d, "m1", "q").json()["choices"][0]["text"] == expected("m1", "q", 4)
    assert complete(d, "m2", "q").json()["choices"][0]["text"] == expected("m2", "q", 4)
    assert complete(d, "m1", "q").json()["choices"][0]["text"] == expected("m1", "q", 4)
    assert d.status()["models"]["m1"]["last_wake_kind"] == "wake"


def test_stop_policy_cold_starts_and_leaves_no_process(make_daemon, expected):
    d = make_daemon(models=two_models("retain", "stop"))
    complete(d, "m1")
    old = d.status()["models"]["m1"]["pids"]
    complete(d, "m2")
    st = d.status()["models"]["m1"]
    assert st["state"] == "stopped" and st["pids"] == [] and not any(alive(p) for p in old)
    assert complete(d, "m1", "z").json()["choices"][0]["text"] == expected("m1", "z", 4)
    assert d.status()["models"]["m1"]["last_wake_kind"] == "cold_start"


def test_failed_sleep_escalates_to_stop(make_daemon, expected):
    p = free_ports(2)
    d = make_daemon(models={"m1": model_entry("m1", p[0], extra=["--sim-fail-sleep"]), "m2": model_entry("m2", p[1])})
    complete(d, "m1")
    pids = d.status()["models"]["m1"]["pids"]
    assert complete(d, "m2", "k").json()["choices"][0]["text"] == expected("m2", "k", 4)
    m1 = d.status()["models"]["m1"]
    assert m1["state"] == "stopped" and "escalated to stop" in m1["last_error"]
    assert not any(alive(p) for p in pids)
    assert metric(d, "llmuxd_eviction_escalations_total", model="m1") == 1
    assert "escalated to stop" in d.log()


def test_cuda_suspend_without_gpu_state_keeps_the_process(make_daemon, expected):
    """cuda_suspend on a tree that holds no GPU state (no GPU here): nothing to suspend, the
    process stays; the wake resumes it as it was.  (The suspend itself needs a GPU: issue 6.)"""
    p = free_ports(2)
    d = make_daemon(models={"m1": model_entry("m1", p[0], "retain", "cuda_suspend"), "m2": model_entry("m2", p[1])})
    complete(d, "m1")
    pids = d.status()["models"]["m1"]["pids"]
    r = d.control("sleep", "m1").json()
    assert r["state"] == "suspended" and r["last_error"] is None
    assert d.status()["models"]["m1"]["pids"] == pids
    assert complete(d, "m1", "s").json()["choices"][0]["text"] == expected("m1", "s", 4)
    assert d.status()["models"]["m1"]["last_wake_kind"] == "wake"


def test_failed_checkpoint_escalates_to_stop(make_daemon, tmp_path):
    p = free_ports(2)
    d = make_daemon(models={"m1": model_entry("m1", p[0], "discard", "checkpoint"), "m2": model_entry("m2", p[1])},
                    checkpoint={"criu_path": str(tmp_path / "no-criu"), "images_dir": str(tmp_path / "ck")})
    complete(d, "m1")
    pids = d.status()["models"]["m1"]["pids"]
    r = d.control("sleep", "m1").json()
    assert r["state"] == "stopped" and "escalated to stop" in r["last_error"]
    assert not any(alive(p) for p in pids)
    assert not (tmp_path / "ck" / "m1").exists() or not any((tmp_path / "ck" / "m1").iterdir())


def test_backend_that_never_becomes_healthy(make_daemon):
    p = free_ports(2)
    # m1's own start-up limit (llmux 0.9's per-model key): m2 keeps the default, so a busy machine
    # cannot make its start fail too
    never = {**model_entry("m1", p[0], extra=["--sim-never-healthy"]), "startup_timeout_secs": 5}
    d = make_daemon(models={"m1": never, "m2": model_entry("m2", p[1])})
    r = complete(d, "m1")
    assert r.status_code == 503 and r.headers["Retry-After"]
    err = r.json()["error"]
    assert err["code"] == "model_unavailable" and "did not become healthy within 5 s" in err["message"]
    st = d.status()["models"]["m1"]
    assert st["state"] == "stopped" and st["pids"] == [] and "did not become healthy" in st["last_error"]
    # what the server wrote meanwhile comes with it (it was stopped before: nothing is added later)
    output = modellog.tail(d.workdir.parent / "logs" / "m1.log", 20, this_run=True)
    assert err["message"].endswith(":\n" + "\n".join(output) if output else "m1.log"), err["message"]
    assert complete(d, "m2").status_code == 200  # the daemon keeps serving the others


def test_backend_crash_mid_stream_and_recovery(make_daemon, expected):
    p = free_ports(2)
    d = make_daemon(models={"m1": model_entry("m1", p[0], extra=["--sim-crash-after-tokens", "5",
                                                                "--sim-token-delay", "0.05"]),
                            "m2": model_entry("m2", p[1])})
    assert complete(d, "m1", "a", 2).status_code == 200  # 2 tokens so far
    with httpx.stream("POST", d.url + "/v1/completions", timeout=30,
                      json={"model": "m1", "prompt": "b", "max_tokens": 10, "stream": True}) as r:
        assert r.status_code == 200
        body = "".join(r.iter_text())
    assert "backend_died" in body and "[DONE]" not in body
    wait_until(lambda: d.status()["models"]["m1"]["state"] == "stopped", 5, what="crash noticed")
    last_error = d.status()["models"]["m1"]["last_error"]
    assert "exited unexpectedly" in last_error
    assert "Simulated engine crash after 5 tokens" in last_error, last_error  # with its own last lines
    assert d.status()["active_model"] is None
    # Next request cold-starts a fresh backend.
    assert complete(d, "m1", "c", 2).json()["choices"][0]["text"] == expected("m1", "c", 2)
    r = complete(d, "m1", "d", 10)  # the engine dies after 3 more tokens: the server's own 500 is relayed
    assert r.status_code == 500 and "EngineDead" in r.text
    wait_until(lambda: d.status()["models"]["m1"]["state"] == "stopped", 5, what="crash noticed")
    assert complete(d, "m2").status_code == 200


def test_backend_killed_mid_request_is_502(make_daemon):
    p = free_ports(1)
    d = make_daemon(models={"m1": model_entry("m1", p[0], extra=["--sim-token-delay", "0.1"])})
    d.control("wake", "m1")
    root = d.status()["models"]["m1"]["pid"]
    killer = threading.Timer(0.5, os.kill, (root, signal.SIGKILL))
    killer.start()
    r = complete(d, "m1", "slow", 30)
    killer.join()
    assert r.status_code == 502 and r.json()["error"]["code"] == "backend_died", r.text
    wait_until(lambda: d.status()["models"]["m1"]["state"] == "stopped", 5, what="death noticed")
    assert "exited unexpectedly" in d.status()["models"]["m1"]["last_error"]


def test_backend_crash_at_startup_is_a_clear_error(make_daemon):
    p = free_ports(1)
    d = make_daemon(models={"m1": {"model_path": "no-such/model", "port": p[0]}})
    r = complete(d, "m1")
    assert r.status_code == 503 and "exited with code" in r.json()["error"]["message"]


def test_metrics(make_daemon):
    d = make_daemon()
    complete(d, "m1")
    complete(d, "m2")
    text = httpx.get(d.url + "/metrics").text
    for name in ("llmuxd_switches_total", "llmuxd_switch_phase_seconds_bucket", "llmuxd_queue_wait_seconds",
                 "llmuxd_requests_in_flight", "llmuxd_model_state", "llmuxd_info"):
        assert name in text
    assert metric(d, "llmuxd_switches_total", from_model="m1", to_model="m2", result="ok") == 1
    assert metric(d, "llmuxd_model_state", model="m2", state="awake") == 1
    assert metric(d, "llmuxd_requests_total", model="m1", status="200") == 1


def test_metrics_port(make_daemon):
    mp = free_ports(1)[0]
    d = make_daemon(metrics_port=mp)
    assert "llmuxd_switches_total" in httpx.get(f"http://127.0.0.1:{mp}/metrics").text


def test_cli_client(make_daemon):
    d = make_daemon()
    cli = [LLMUXD]
    args = ["--config", str(d.config_path)]
    r = subprocess.run(cli + ["wake", "m2"] + args, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("m2: awake ("), r.stdout + r.stderr
    r = subprocess.run(cli + ["status"] + args, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "active: m2" in r.stdout and "offload+keep_running" in r.stdout
    r = subprocess.run(cli + ["status", "--json"] + args, capture_output=True, text=True, timeout=60)
    assert json.loads(r.stdout)["active_model"] == "m2"
    r = subprocess.run(cli + ["sleep", "m2"] + args, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("m2: asleep"), r.stdout
    r = subprocess.run(cli + ["wake", "nope"] + args, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "does not exist" in r.stderr
    r = subprocess.run(cli + ["status", "--url", "http://127.0.0.1:1"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "cannot reach the daemon" in r.stderr


def test_sigterm_stops_every_backend(make_daemon):
    d = make_daemon()
    complete(d, "m1")
    d.status()
    complete(d, "m2")
    d.status()
    assert len(d.backend_pids) >= 4  # two trees of server + engine (+ helpers)
    assert d.stop() == 0
    assert d.leftovers == []
    assert "stopped" in d.log()


def test_model_log_is_private_and_a_planted_link_is_not_followed(make_daemon, tmp_path, expected):
    """The model's log is created 0600 in a 0700 folder; a symbolic link planted at its name is
    refused (the cold start fails with the reason), never written through."""
    d = make_daemon()
    logs = tmp_path / "logs"
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    r = httpx.post(d.url + "/v1/completions", json={"model": "m1", "prompt": "x", "max_tokens": 2}, timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected("m1", "x", 2)
    assert oct(os.stat(logs).st_mode & 0o777) == "0o700"
    os.symlink(victim, logs / "m2.log")
    r = httpx.post(d.url + "/v1/completions", json={"model": "m2", "prompt": "x", "max_tokens": 2}, timeout=30)
    assert r.status_code == 503, r.text
    assert "cold start failed" in d.status()["models"]["m2"]["last_error"]
    assert victim.read_text() == "untouched\n"
    assert oct(os.stat(logs / "m1.log").st_mode & 0o777) == "0o600"
