"""Prometheus metrics as a scraper sees them: a real daemon on the simulator, requests that make
it cold-start, wake, checkpoint and restore models, /metrics read with a real HTTP client from
its own metrics_port and parsed with prometheus_client's parser; and the Grafana dashboard's
queries checked against what such a scrape exposes."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import model_entry
from harness import REPO, free_ports, wait_until
from llmuxd.cuda import select_checkpointer
from llmuxd.events import State
from llmuxd.model.eviction import CudaSuspend
from test_cuda_doctor import FakeTool

DASHBOARD = REPO / "examples" / "grafana" / "llmuxd-dashboard.json"


class Scrape:
    """One parsed scrape: samples by name and labels, and every series name it declares."""

    def __init__(self, text: str):
        self.text = text
        self.families = list(text_string_to_metric_families(text))
        self.samples = [s for f in self.families for s in f.samples]

    def value(self, name: str, **labels) -> float:
        """The sum of the samples of ``name`` whose labels include ``labels`` (0 if none)."""
        return sum(s.value for s in self.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    def series(self, name: str) -> list[dict]:
        return [s.labels for s in self.samples if s.name == name]

    def names(self) -> set[str]:
        """Every series name a query may use: those with samples, and those a declared family
        (HELP/TYPE, maybe no samples yet) stands for."""
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",),
                    "info": ("_info",), "summary": ("", "_sum", "_count")}
        names = {s.name for s in self.samples}
        for f in self.families:
            names.update(f.name + sfx for sfx in suffixes.get(f.type, ("",)))
        return names


def scrape(url: str) -> Scrape:
    r = httpx.get(url + "/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r
    return Scrape(r.text)


def complete(d, model: str, prompt: str) -> httpx.Response:
    r = httpx.post(d.url + "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 4}, timeout=120)
    assert r.status_code == 200, r.text
    return r


@pytest.mark.criu
def test_switches_phases_requests_and_checkpoint_bytes_by_model_and_kind(make_daemon, tmp_path, expected):
    mp = free_ports(1)[0]
    p = free_ports(2)
    d = make_daemon(models={"m1": model_entry("m1", p[0], "discard", "checkpoint"), "m2": model_entry("m2", p[1])},
                    checkpoint={"criu_path": "/usr/local/bin/criu", "images_dir": str(tmp_path / "ck")},
                    metrics_port=mp)
    metrics_url = f"http://127.0.0.1:{mp}"
    assert "llmuxd_switch_seconds" not in {s.name for s in scrape(metrics_url).samples}  # nothing switched yet

    complete(d, "m1", "a")  # cold start of m1
    complete(d, "m2", "b")  # m1 checkpointed (the dump ends in the background), m2 cold-started
    wait_until(lambda: d.status()["models"]["m1"]["state"] == "checkpointed", 60, what="m1's dump")
    dumped = d.status()["models"]["m1"]["last_checkpoint"]["image_bytes"]
    assert dumped > 0
    assert complete(d, "m1", "c").json()["choices"][0]["text"] == expected("m1", "c", 4)  # m2 asleep, m1 restored
    complete(d, "m2", "e")  # m1 checkpointed again (keep_images: the images are reused), m2 woken
    st = d.status()["models"]
    assert st["m1"]["last_wake_kind"] == "restore" and st["m2"]["last_wake_kind"] == "wake", st
    assert st["m1"]["last_checkpoint"] == {"reused": True}

    s = scrape(metrics_url)
    assert {f.name for f in scrape(d.url).families} == {f.name for f in s.families}  # the main port's too
    # No _created series, none at all.
    assert not [n for n in s.names() if n.endswith("_created")] and "_created" not in s.text

    # Whole switches, by the model switched to and how it came to serve.
    switches = {(x["model"], x["kind"]) for x in s.series("llmuxd_switch_seconds_count")}
    assert switches == {("m1", "cold_start"), ("m2", "cold_start"), ("m1", "restore"), ("m2", "wake")}, switches
    for model, kind in switches:
        assert s.value("llmuxd_switch_seconds_count", model=model, kind=kind) == 1
        assert s.value("llmuxd_switch_seconds_bucket", model=model, kind=kind, le="+Inf") == 1
        # A switch contains its model's wake phase (and, but for the first, an eviction).
        assert (s.value("llmuxd_switch_seconds_sum", model=model, kind=kind)
                >= s.value("llmuxd_switch_phase_seconds_sum", model=model, phase="wake", kind=kind) > 0)
    assert s.value("llmuxd_switches_total", result="ok") == 4

    # Phases, by model and kind: evictions carry their process strategy.
    phases = {(x["model"], x["phase"], x["kind"]): s.value("llmuxd_switch_phase_seconds_count", **x)
              for x in s.series("llmuxd_switch_phase_seconds_count")}
    assert phases == {
        ("m1", "wake", "cold_start"): 1, ("m1", "wake", "restore"): 1,
        ("m2", "wake", "cold_start"): 1, ("m2", "wake", "wake"): 1,
        ("m1", "drain", "checkpoint"): 2, ("m1", "sleep", "checkpoint"): 2, ("m1", "dump", "checkpoint"): 1,
        ("m2", "drain", "keep_running"): 1, ("m2", "sleep", "keep_running"): 1,
    }, phases

    # Requests: counted and timed in one place, by model and status; each request for a model
    # that was not awake waited for its whole switch.
    for model in ("m1", "m2"):
        assert s.value("llmuxd_requests_total", model=model, status="200") == 2
        assert s.value("llmuxd_request_duration_seconds_count", model=model, status="200") == 2
        assert (s.value("llmuxd_request_duration_seconds_sum", model=model, status="200")
                >= s.value("llmuxd_switch_seconds_sum", model=model))
    assert {x["status"] for x in s.series("llmuxd_request_duration_seconds_count")} == {"200"}

    # Checkpoint bytes: one dump written, restored once; the reused images are not counted again.
    assert s.value("llmuxd_checkpoint_dumped_bytes_total", model="m1") == dumped
    assert s.value("llmuxd_checkpoint_restored_bytes_total", model="m1") == dumped
    assert s.value("llmuxd_checkpoint_dumped_bytes_total", model="m2") == 0
    assert s.value("llmuxd_checkpoint_restored_bytes_total", model="m2") == 0

    assert s.value("llmuxd_model_state", model="m1", state="checkpointed") == 1
    assert s.value("llmuxd_model_state", model="m2", state="awake") == 1
    assert s.value("llmuxd_eviction_escalations_total") == 0 and s.value("llmuxd_restore_failures_total") == 0


def test_a_failed_eviction_is_of_kind_escalated(make_daemon):
    p = free_ports(2)
    d = make_daemon(models={"m1": model_entry("m1", p[0], extra=["--sim-fail-sleep"]), "m2": model_entry("m2", p[1])})
    complete(d, "m1", "a")
    complete(d, "m2", "b")
    s = scrape(d.url)
    assert s.value("llmuxd_switch_phase_seconds_count", model="m1", phase="sleep", kind="escalated") == 1
    assert s.value("llmuxd_switch_phase_seconds_count", model="m1", phase="sleep", kind="keep_running") == 0
    assert s.value("llmuxd_eviction_escalations_total", model="m1") == 1
    assert s.value("llmuxd_switch_seconds_count", model="m2", kind="cold_start") == 1


class _StubModel:
    """What :class:`CudaSuspend` sees of its model, with a GPU stand-in for cuda-checkpoint."""

    def __init__(self, checkpointer):
        self.checkpointer = checkpointer
        self.states: list[State] = []
        self.weights_woken = 0
        self.marks: list[str] = []
        self.steps: list[str] = []
        self.backend = self  # the marker lines in the model's output

    def mark(self, what: str, *, create: bool = True) -> None:
        self.marks.append(what)

    def set_state(self, new: State) -> None:
        self.states.append(new)

    def step(self, name: str) -> None:
        self.steps.append(name)

    def cuda_suspender(self):
        return self.checkpointer

    async def wake_weights(self) -> None:
        self.weights_woken += 1


def test_cuda_suspend_wake_kind_is_resume_when_cuda_state_was_suspended(tmp_path):
    """GPU stand-in (the fake cuda-checkpoint of test_cuda_doctor): a process whose CUDA state
    was suspended comes back by ``resume``; one that held none (no GPU) by ``wake``."""
    tool = FakeTool(tmp_path, [101])
    (tool.state / "101").write_text("checkpointed\n")
    cp, _ = select_checkpointer(str(tool.path), libcuda=str(tmp_path / "no-libcuda.so"))
    model = _StubModel(cp)
    strategy = CudaSuspend(model)
    strategy.suspended = [101]
    assert strategy.expected_kind() == "resume"
    assert asyncio.run(strategy.resume()) == "resume"
    assert tool.states() == {101: "running"} and strategy.suspended == []
    assert asyncio.run(strategy.resume()) == "wake"  # nothing suspended this time
    assert model.states == [State.WAKING, State.WAKING] and model.weights_woken == 2
    assert model.marks == ["waking", "waking"]
    assert model.steps == ["cuda_resume"] and strategy.expected_kind() == "wake"  # a step only when resumed


def _exprs(node) -> list[str]:
    """Every ``expr`` (a panel target's PromQL) anywhere under ``node``."""
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "expr" and isinstance(v, str)] + \
            [e for k, v in node.items() if k != "expr" for e in _exprs(v)]
    if isinstance(node, list):
        return [e for v in node for e in _exprs(v)]
    return []


def _queries(board: dict) -> list[str]:
    """Every PromQL expression of a dashboard: its panels' targets (rows' panels too) and its
    query variables."""
    found = _exprs(board["panels"])
    for var in board["templating"]["list"]:
        if var.get("type") == "query":
            q = var["query"]
            found.append(q if isinstance(q, str) else q["query"])
    return found


def test_grafana_dashboard_queries_only_name_metrics_a_daemon_exposes(make_daemon):
    d = make_daemon()
    complete(d, "m1", "a")
    complete(d, "m2", "b")
    exposed = scrape(d.url).names()
    board = json.loads(DASHBOARD.read_text())
    assert board["title"] and board["panels"]
    queries = _queries(board)
    assert len(queries) >= 10
    used: set[str] = set()
    for q in queries:
        names = set(re.findall(r"\bllmuxd_[a-z0-9_]+\b", q))
        assert names, f"a query that names no llmuxd metric: {q!r}"
        assert names <= exposed, f"{q!r} names {sorted(names - exposed)}, not in a scrape"
        used |= names
    # What the dashboard is for: every one of these is graphed.
    for want in ("llmuxd_switch_seconds_bucket", "llmuxd_request_duration_seconds_bucket", "llmuxd_requests_total",
                 "llmuxd_requests_queued", "llmuxd_requests_in_flight", "llmuxd_model_state",
                 "llmuxd_eviction_escalations_total", "llmuxd_restore_failures_total",
                 "llmuxd_checkpoint_dumped_bytes_total", "llmuxd_checkpoint_restored_bytes_total"):
        assert want in used, want
    # Each panel's datasource is the dashboard's variable, so it imports into any Grafana.
    assert any(v.get("type") == "datasource" for v in board["templating"]["list"])

