"""The controller's answers, typed: a model's status, the whole daemon's status, and the result
of a transition.  Built by the switcher and the models; the HTTP API sends them as JSON
(``model_dump``), D-Bus picks fields from them, the CLI reads them back from JSON."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Contract(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def json_dict(self) -> dict:
        return self.model_dump(mode="json", by_alias=True)


class EvictionPolicy(_Contract):
    weights: str
    process: str


class DumpRecord(_Contract):
    """The last eviction that dumped the tree."""

    path: str
    image_bytes: int
    saved_files: int
    seconds: dict[str, float]


class ReusedCheckpoint(_Contract):
    """The last eviction reused the checkpoint the tree was restored from (``keep_images``)."""

    reused: bool = True


class RestoreRecord(_Contract):
    from_: str = Field(alias="from")
    created: str
    prepared: int
    seconds: dict[str, float]

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Progress(_Contract):
    """A model's transition in progress: the phase, its kind and its step (the vocabulary of
    :mod:`llmuxd.events`), how long each has run, and how long each typically takes for this
    model (the median of its last few of that phase and kind that completed; None before the
    first)."""

    phase: str
    kind: str  # as in llmuxd_switch_phase_seconds{kind} (a wake's: the way it is expected to go)
    elapsed_secs: float
    typical_secs: float | None
    step: str | None = None
    step_elapsed_secs: float | None = None
    step_typical_secs: float | None = None

    @property
    def label(self) -> str:
        """What a person calls it: a wake by its kind (``cold_start``, ``restore``...), an
        eviction's phase by its name (``drain``, ``sleep``, ``dump``)."""
        return self.kind if self.phase == "wake" else self.phase


class ProgressEvent(_Contract):
    """One event of ``GET /control/events``.  ``in_progress``: a phase already running when the
    stream opened; ``phase_done``/``phase_failed`` carry the phase's duration in
    ``progress.elapsed_secs`` (and, when failed, the step it failed in).  ``seq`` numbers the
    daemon's events (``Status.event_seq`` is the last one's); ``time`` is Unix time."""

    event: Literal["in_progress", "phase_started", "step", "phase_done", "phase_failed"]
    seq: int
    time: float
    model: str
    progress: Progress


class ModelStatus(_Contract):
    name: str
    state: str
    eviction: EvictionPolicy
    port: int
    pid: int | None
    cgroup: str | None
    pids: list[int]
    last_wake_secs: float | None
    last_wake_kind: str | None
    last_sleep_secs: float | None
    last_error: str | None
    escalations: int  # evictions that failed and fell back to stop
    restore_failures: int  # restores that failed (then cold-started)
    checkpoint_path: str
    last_checkpoint: DumpRecord | ReusedCheckpoint | None
    last_restore: RestoreRecord | None
    # A reload changed its settings while it was awake: it serves with the old ones until its
    # next eviction, which stops it; its next wake starts it with the new ones.
    restart_pending: bool = False
    in_flight: int = 0  # requests being served (set by the switcher)
    waiting: int = 0  # requests waiting for this model (set by the switcher)
    progress: Progress | None = None  # the transition in progress (set by the switcher)


class Switching(_Contract):
    from_: str | None = Field(alias="from")
    to: str

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class TransitionRecord(_Contract):
    """One finished transition, kept in the daemon's recent history (newest last).

    ``kind``: ``switch`` (the whole switch to ``model``: eviction of ``from_model``, then the
    wake), or a model's own step: ``cold_start``, ``wake``, ``cuda_resume``, ``restore``,
    ``sleep``, ``dump`` (a checkpoint finishing in the background), ``stop``, ``exited`` (the
    backend ended on its own)."""

    kind: str
    model: str
    from_model: str | None = None
    started_at: float  # Unix time
    duration_secs: float
    ok: bool
    state: str | None = None  # a model's step: the state it ended in


class Status(_Contract):
    active_model: str | None
    switching: Switching | None
    queue_depth: int
    models: dict[str, ModelStatus]
    recent_transitions: list[TransitionRecord] = []
    event_seq: int = 0  # the seq of the last event of /control/events


class GpuDevice(_Contract):
    index: int
    name: str
    memory_total: int | None  # bytes
    memory_used: int | None
    memory_free: int | None


class GpuMemory(_Contract):
    """GPU memory now: ``source`` is ``nvml``, ``nvidia-smi``, ``simulator`` (the models are
    llmuxd-vllm-sim, which models a GPU) or None (no GPU here: nothing to show)."""

    source: str | None
    devices: list[GpuDevice] = []
    by_model: dict[str, int] = {}  # bytes held by each model's processes, where known


class LogTail(_Contract):
    """The last lines of a model's own output (its ``<log_dir>/<model>.log``), control
    characters escaped and secrets redacted."""

    model: str
    lines: list[str]


class Transition(_Contract):
    """What a control verb (wake, sleep) did: the model's state afterwards and how long it took
    (0 when there was nothing to do); a sleep also says the model's last error."""

    model: str
    state: str
    duration_secs: float
    last_error: str | None = None


class ReloadResult(_Contract):
    """What a reload did (see ``llmuxd/reload.py``)."""

    config_path: str
    added: list[str]  # now available, not started
    removed: list[str]  # stopped (their checkpoints stay on disk)
    changed: dict[str, list[str]]  # model -> what changed; started with the new settings when next needed
    unchanged: list[str]  # untouched
    restart_pending: list[str]  # changed models still serving with their old settings until their next eviction
    applied: list[str]  # global settings that changed and are in force now
    needs_restart: list[str]  # global settings whose new value needs a restart of llmuxd: the old one is kept
    duration_secs: float

    def summary(self) -> str:
        parts = [f"{what} {', '.join(names)}" for what, names in (
            ("added", self.added), ("removed", self.removed),
            ("changed", [f"{n} ({', '.join(keys)})" for n, keys in self.changed.items()]),
            ("unchanged", self.unchanged), ("restart pending for", self.restart_pending),
            ("applied", self.applied), ("needs a restart (old value kept)", self.needs_restart)) if names]
        return "; ".join(parts) or "nothing changed"
