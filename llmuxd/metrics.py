"""Prometheus metrics (prefix ``llmuxd_``, base units), fed by the models' and the switcher's events.

``kind`` labels: a switch's and a ``wake`` phase's kind is how the model came to serve
(``cold_start``, ``wake``, ``resume``, ``restore``); an eviction's phases (``drain``, ``sleep``,
``dump``) carry its process strategy (``keep_running``, ``cuda_suspend``, ``checkpoint``,
``stop``) or ``escalated``.  No ``_created`` series are exported."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

from . import __version__
from .events import Listener, State

# The series are enough; a `_created` timestamp per series doubles what every scrape carries.
disable_created_metrics()

_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class Metrics(Listener):
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, models: list[str]):
        r = self.registry = CollectorRegistry()
        self._per_request: dict[tuple[str, str], tuple] = {}
        Gauge("llmuxd_info", "llmuxd build information", ["version"], registry=r).labels(__version__).set(1)
        self.switches = Counter(
            "llmuxd_switches_total", "Model switches by outcome", ["from_model", "to_model", "result"], registry=r
        )
        self.switch_seconds = Histogram(
            "llmuxd_switch_seconds", "Whole switches that succeeded (eviction of the active model included), by the "
            "model switched to and how it came to serve", ["model", "kind"], buckets=_SECONDS_BUCKETS, registry=r,
        )
        self.phase = Histogram(
            "llmuxd_switch_phase_seconds", "Duration of transition phases (drain, sleep, dump, wake)",
            ["model", "phase", "kind"], buckets=_SECONDS_BUCKETS, registry=r,
        )
        self.queue_wait = Histogram(
            "llmuxd_queue_wait_seconds", "Time requests waited for their model", ["model"],
            buckets=_SECONDS_BUCKETS, registry=r,
        )
        self.in_flight = Gauge("llmuxd_requests_in_flight", "Requests being served", ["model"], registry=r)
        self.queued = Gauge("llmuxd_requests_queued", "Requests waiting for their model", ["model"], registry=r)
        self.requests = Counter("llmuxd_requests_total", "Proxied requests by status", ["model", "status"], registry=r)
        self.request_seconds = Histogram(
            "llmuxd_request_duration_seconds", "Proxied requests from arrival to their end (queueing included), by "
            "status", ["model", "status"], buckets=_SECONDS_BUCKETS, registry=r,
        )
        self.state = Gauge("llmuxd_model_state", "1 for the model's current state", ["model", "state"], registry=r)
        self.escalations = Counter(
            "llmuxd_eviction_escalations_total", "Evictions that failed and were escalated to stop", ["model"],
            registry=r,
        )
        self.restore_failures = Counter(
            "llmuxd_restore_failures_total", "Restores from a checkpoint that failed (then cold-started)",
            ["model", "reason"], registry=r,
        )
        self.dumped_bytes = Counter(
            "llmuxd_checkpoint_dumped_bytes_total", "Bytes of CRIU images written by checkpoint dumps", ["model"],
            registry=r,
        )
        self.restored_bytes = Counter(
            "llmuxd_checkpoint_restored_bytes_total", "Bytes of CRIU images of checkpoints restored", ["model"],
            registry=r,
        )
        self.reloads = Counter("llmuxd_config_reloads_total", "Reloads of the configuration by result (ok, refused: "
                               "an invalid file; error: failed while applied)", ["result"], registry=r)
        for result in ("ok", "refused", "error"):
            self.reloads.labels(result)
        for m in models:
            self.model_added(m, State.STOPPED)

    def _set_state(self, model: str, state: State) -> None:
        for s in State:
            self.state.labels(model, s.value).set(1 if s is state else 0)

    def request_done(self, model: str, status: str, seconds: float) -> None:
        # Once per proxied request: the labelled children are looked up once per (model, status).
        children = self._per_request.get((model, status))
        if children is None:
            children = self._per_request[(model, status)] = (self.requests.labels(model, status),
                                                             self.request_seconds.labels(model, status))
        children[0].inc()
        children[1].observe(seconds)

    def state_changed(self, model: str, old: State, new: State) -> None:
        self._set_state(model, new)

    def model_added(self, model: str, state: State) -> None:
        self.in_flight.labels(model).set(0)
        self.queued.labels(model).set(0)
        self.escalations.labels(model)
        self.dumped_bytes.labels(model)
        self.restored_bytes.labels(model)
        self._set_state(model, state)

    def model_removed(self, model: str) -> None:
        """The gauges of a model that is gone go with it (its counters stay)."""
        for gauge, labels in [(self.in_flight, [model]), (self.queued, [model]),
                              *((self.state, [model, s.value]) for s in State)]:
            try:
                gauge.remove(*labels)
            except KeyError:
                pass

    def reload_done(self, result: str) -> None:
        self.reloads.labels(result).inc()

    def phase_done(self, model: str, phase: str, seconds: float, kind: str) -> None:
        self.phase.labels(model, phase, kind).observe(seconds)

    def escalated(self, model: str, reason: str) -> None:
        self.escalations.labels(model).inc()

    def restore_failed(self, model: str, reason: str) -> None:
        self.restore_failures.labels(model, reason).inc()

    def checkpoint_written(self, model: str, image_bytes: int) -> None:
        self.dumped_bytes.labels(model).inc(image_bytes)

    def checkpoint_restored(self, model: str, image_bytes: int) -> None:
        self.restored_bytes.labels(model).inc(image_bytes)

    def render(self) -> bytes:
        return generate_latest(self.registry)
