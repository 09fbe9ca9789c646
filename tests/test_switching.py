"""Switching between models under load, draining, timeouts and shared wakes — real daemon,
real simulator processes, the simulated GPU budget watched throughout."""

from __future__ import annotations

import asyncio
import re
import threading
import time

import httpx
import pytest

from conftest import model_entry
from harness import alternating_load, free_ports, wait_until
from llmuxd.sim import gpu as simgpu


class GpuWatch:
    """Samples the simulated GPU every few ms: the budget must never be exceeded and at most
    one model may hold GPU memory at a time."""

    def __init__(self, gpu_dir: str):
        self.dir = gpu_dir
        self.max_used = 0
        self.max_leases = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            u = simgpu.usage(self.dir)
            self.max_used = max(self.max_used, u["used"])
            self.max_leases = max(self.max_leases, len(u["leases"]))
            time.sleep(0.005)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def metric(daemon, name: str, **labels) -> float:
    text = httpx.get(daemon.url + "/metrics").text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def two_models(weights="offload", process="keep_running", extra=()):
    p = free_ports(2)
    return {"m1": model_entry("m1", p[0], weights, process, extra), "m2": model_entry("m2", p[1], weights, process, extra)}


def test_concurrent_requests_share_one_wake(make_daemon, expected):
    d = make_daemon()

    async def go():
        async with httpx.AsyncClient(timeout=60) as c:
            rs = await asyncio.gather(*(c.post(d.url + "/v1/completions", json={
                "model": "m1", "prompt": f"p{i}", "max_tokens": 4}) for i in range(12)))
        return rs

    rs = asyncio.run(go())
    assert [r.json()["choices"][0]["text"] for r in rs] == [expected("m1", f"p{i}", 4) for i in range(12)]
    assert metric(d, "llmuxd_switches_total", to_model="m1") == 1
    assert d.log().count("m1: spawned pid") == 1


@pytest.mark.parametrize("weights,process", [("offload", "keep_running"), ("discard", "keep_running"),
                                             ("retain", "stop")])
def test_switching_under_load(make_daemon, sim_env, expected, weights, process):
    """24 clients alternate between two models, half of them streaming: every answer is the
    right one for its model, none lost, the GPU budget never exceeded, no thrash loop."""
    d = make_daemon(models=two_models(weights, process, ["--sim-token-delay", "0.02"]))
    clients, rounds = 24, 4
    with GpuWatch(sim_env["LLMUXD_SIM_GPU_DIR"]) as gpu:
        results, errors = alternating_load(d.url, clients, rounds, 6)
    assert not errors, errors[:3]
    assert len(results) == clients * rounds
    wrong = [(m, p) for m, p, t in results if t != expected(m, p, 6)]
    assert not wrong, f"{len(wrong)} wrong answers, e.g. {wrong[:3]}"
    assert gpu.max_leases <= 1 and gpu.max_used <= simgpu.budget()
    switches = metric(d, "llmuxd_switches_total", result="ok")
    assert 2 <= switches <= 2 * rounds + 2, f"{switches} switches for {rounds} rounds: thrashing"
    assert metric(d, "llmuxd_switches_total", result="error") == 0
    assert metric(d, "llmuxd_requests_in_flight") == 0 and metric(d, "llmuxd_requests_queued") == 0


def test_open_stream_is_drained_before_eviction(make_daemon, expected):
    d = make_daemon(models=two_models(extra=["--sim-token-delay", "0.1"]))
    d.control("wake", "m1")
    got: dict = {}

    def stream():
        with httpx.stream("POST", d.url + "/v1/completions", json={
                "model": "m1", "prompt": "long", "max_tokens": 20, "stream": True}, timeout=60) as r:
            got["body"] = r.read().decode()
            got["done"] = time.monotonic()

    t = threading.Thread(target=stream)
    t.start()
    wait_until(lambda: d.status()["models"]["m1"]["in_flight"] == 1, 10, what="stream in flight")
    r = d.control("wake", "m2")
    woke = time.monotonic()
    t.join()
    assert r.status_code == 200 and r.json()["state"] == "awake"
    text = "".join(re.findall(r'"text":\s*"([^"]*)"', got["body"]))
    assert text == expected("m1", "long", 20) and got["body"].endswith("data: [DONE]\n\n")
    assert got["done"] <= woke  # m1 was evicted only after its stream finished
    assert metric(d, "llmuxd_switch_phase_seconds_count", phase="drain") >= 1


def test_min_active_secs_keeps_a_fresh_model_awake(make_daemon):
    d = make_daemon(policy={"min_active_secs": 1.5})
    assert httpx.post(d.url + "/v1/completions", json={"model": "m1", "prompt": "a"}, timeout=60).status_code == 200
    m1_served = time.monotonic()  # m1 woke just before this
    switch = threading.Thread(target=httpx.post, args=(d.url + "/v1/completions",),
                              kwargs={"json": {"model": "m2", "prompt": "a"}, "timeout": 60})
    switch.start()
    time.sleep(0.5)
    # Inside the window m1 still serves at once, although a switch to m2 is pending.
    t = time.monotonic()
    assert httpx.post(d.url + "/v1/completions", json={"model": "m1", "prompt": "b"}, timeout=60).status_code == 200
    assert time.monotonic() - t < 1.0 and d.status()["models"]["m1"]["state"] == "awake"
    switch.join()
    assert time.monotonic() - m1_served >= 1.3  # m1 was not evicted before its 1.5 s were up
    assert d.status()["active_model"] == "m2"


def test_queue_timeout_then_switch_still_completes(make_daemon):
    p = free_ports(1)
    d = make_daemon(models={"m1": model_entry("m1", p[0], extra=["--sim-load-seconds", "3"])},
                    policy={"request_timeout_secs": 1})
    t0 = time.monotonic()
    r = httpx.post(d.url + "/v1/completions", json={"model": "m1", "prompt": "a"}, timeout=30)
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "queue_timeout" and time.monotonic() - t0 < 2.9
    # The client is gone; the switch it caused goes on.
    wait_until(lambda: d.status()["models"]["m1"]["state"] == "awake", 20, what="m1 awake")
    assert metric(d, "llmuxd_requests_queued") == 0


def test_switch_goes_on_when_client_goes_away(make_daemon):
    p = free_ports(1)
    d = make_daemon(models={"m1": model_entry("m1", p[0], extra=["--sim-load-seconds", "1.5"])})
    with pytest.raises(httpx.TimeoutException):
        httpx.post(d.url + "/v1/completions", json={"model": "m1", "prompt": "a"}, timeout=0.3)
    wait_until(lambda: d.status()["models"]["m1"]["state"] == "awake", 20, what="m1 awake")
    wait_until(lambda: d.status()["queue_depth"] == 0, 5, what="queue empty")
    assert httpx.post(d.url + "/v1/completions", json={"model": "m1", "prompt": "a"}, timeout=30).status_code == 200
