"""Prometheus metrics (prefix ``llmuxd_``, base units), fed by the models' and the switcher's events."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

from . import __version__
from .events import Listener, State

_PHASE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class Metrics(Listener):
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, models: list[str]):
        r = self.registry = CollectorRegistry()
        Gauge("llmuxd_info", "llmuxd build information", ["version"], registry=r).labels(__version__).set(1)
        self.switches = Counter(
            "llmuxd_switches_total", "Model switches by outcome", ["from_model", "to_model", "result"], registry=r
        )
        self.phase = Histogram(
            "llmuxd_switch_phase_seconds", "Duration of switch phases", ["phase"], buckets=_PHASE_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "llmuxd_queue_wait_seconds", "Time requests waited for their model", ["model"],
            buckets=_PHASE_BUCKETS, registry=r,
        )
        self.in_flight = Gauge("llmuxd_requests_in_flight", "Requests being served", ["model"], registry=r)
        self.queued = Gauge("llmuxd_requests_queued", "Requests waiting for their model", ["model"], registry=r)
        self.requests = Counter("llmuxd_requests_total", "Proxied requests by status", ["model", "status"], registry=r)
        self.state = Gauge("llmuxd_model_state", "1 for the model's current state", ["model", "state"], registry=r)
        self.escalations = Counter(
            "llmuxd_eviction_escalations_total", "Evictions that failed and were escalated to stop", ["model"],
            registry=r,
        )
        self.restore_failures = Counter(
            "llmuxd_restore_failures_total", "Restores from a checkpoint that failed (then cold-started)",
            ["model", "reason"], registry=r,
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

    def state_changed(self, model: str, old: State, new: State) -> None:
        self._set_state(model, new)

    def model_added(self, model: str, state: State) -> None:
        self.in_flight.labels(model).set(0)
        self.queued.labels(model).set(0)
        self.escalations.labels(model)
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

    def phase_done(self, model: str, phase: str, seconds: float) -> None:
        self.phase.labels(phase).observe(seconds)

    def escalated(self, model: str, reason: str) -> None:
        self.escalations.labels(model).inc()

    def restore_failed(self, model: str, reason: str) -> None:
        self.restore_failures.labels(model, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
