"""llmuxd configuration: llmux's ``config.json``, read unchanged, validated with pydantic.

Every key llmux documents is accepted.  Keys llmuxd does not act on (llmux's alternative
scheduling policies, its admin port, warm-up) are accepted and reported once at start-up, so a
config written for llmux starts llmuxd without edits.  A key neither project knows is an error.
"""

from __future__ import annotations

import json
import re
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

DEFAULT_CONFIG_PATH = Path("/etc/llmux/config.json")

# A model name becomes a folder name (logs, cgroups, checkpoints) and a URL/D-Bus string:
# letters, digits, dot, dash, underscore; no leading dot, so no "..", no "/", no hidden files.
_MODEL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")


class ConfigError(Exception):
    """The configuration cannot be used.  ``problems`` holds one line per problem."""

    def __init__(self, path: Path | str, problems: list[str]):
        self.path = str(path)
        self.problems = problems
        super().__init__(f"{path}: " + "; ".join(problems))

    def render(self) -> str:
        lines = [f"invalid configuration {self.path}:"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


class WeightsEviction(str, Enum):
    """What happens to a model's weights when it is evicted (vLLM sleep level)."""

    RETAIN = "retain"  # nothing: weights stay on the GPU
    OFFLOAD = "offload"  # sleep level 1: weights copied to host RAM, KV cache dropped
    DISCARD = "discard"  # sleep level 2: weights and KV cache dropped; reloaded on wake

    @property
    def sleep_level(self) -> int | None:
        return {"retain": None, "offload": 1, "discard": 2}[self.value]


class ProcessEviction(str, Enum):
    """What happens to a model's process tree when it is evicted."""

    KEEP_RUNNING = "keep_running"
    CUDA_SUSPEND = "cuda_suspend"
    CHECKPOINT = "checkpoint"
    STOP = "stop"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Eviction(_Strict):
    weights: WeightsEviction = WeightsEviction.RETAIN
    process: ProcessEviction = ProcessEviction.STOP

    @field_validator("weights", "process", mode="before")
    @classmethod
    def _enum_from_str(cls, v: Any, info) -> Any:  # strict mode wants enum instances
        if isinstance(v, str):
            enum = WeightsEviction if info.field_name == "weights" else ProcessEviction
            try:
                return enum(v)
            except ValueError:
                allowed = "|".join(e.value for e in enum)
                raise ValueError(f"must be one of {allowed}, got {v!r}") from None
        return v

    def __str__(self) -> str:
        return f"{self.weights.value}+{self.process.value}"


# llmux's legacy single-number sleep levels, mapped onto the two axes.
_LEGACY_SLEEP_LEVELS = {
    1: Eviction(weights=WeightsEviction.OFFLOAD, process=ProcessEviction.KEEP_RUNNING),
    2: Eviction(weights=WeightsEviction.DISCARD, process=ProcessEviction.KEEP_RUNNING),
    3: Eviction(weights=WeightsEviction.RETAIN, process=ProcessEviction.CUDA_SUSPEND),
    4: Eviction(weights=WeightsEviction.DISCARD, process=ProcessEviction.CHECKPOINT),
    5: Eviction(weights=WeightsEviction.RETAIN, process=ProcessEviction.STOP),
}


class ModelConfig(_Strict):
    model_path: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    eviction: Eviction | None = None  # None: policy.eviction applies
    extra_args: list[str] = []
    checkpoint_path: str | None = None
    sleep_level: int | None = Field(default=None, ge=1, le=5)  # llmux < 0.9
    # llmuxd: add --enable-sleep-mode?  None = when the weights axis needs it.  vLLM's CPU
    # build refuses the flag yet serves the sleep endpoints in dev mode: set false there.
    enable_sleep_mode: bool | None = None


class PolicyConfig(_Strict):
    policy_type: str = "fifo"
    request_timeout_secs: float = Field(default=300, gt=0)
    drain_before_switch: bool = True
    min_active_secs: float = Field(default=5, ge=0)
    startup_timeout_secs: float = Field(default=1800, gt=0)
    # llmuxd: how long an eviction waits for in-flight requests; streams still open then end
    # with an SSE error frame and the switch goes on.
    drain_timeout_secs: float = Field(default=30, gt=0)
    # llmuxd: the longest silence tolerated from a backend while it answers (between two
    # chunks of a stream, or before the response starts).
    upstream_read_timeout_secs: float = Field(default=300, gt=0)
    # llmuxd: requests waiting for their model at most; more get 429 with Retry-After.
    max_queued_requests: int = Field(default=1024, ge=1)
    eviction: Eviction = Eviction()
    sleep_level: int | None = Field(default=None, ge=1, le=5)
    # llmux's cost_aware / time_slice tuning; accepted, not acted on (llmuxd schedules FIFO).
    coalesce_window_ms: int | None = None
    amortization_factor: float | None = None
    max_wait_secs: float | None = None
    tick_interval_ms: int | None = None
    min_quantum_ms: int | None = None


class CheckpointConfig(_Strict):
    criu_path: str = "criu"
    cuda_plugin_dir: str = "/usr/lib/criu/"
    images_dir: str = "/tmp/llmux-checkpoints"
    cuda_checkpoint_path: str = "cuda-checkpoint"
    keep_images: bool = True
    # llmuxd: a root-only file holding a secret key; with it every checkpoint carries a keyed
    # MAC over its manifest and the digests of its images and saved files, and a checkpoint
    # without a valid tag is refused (for checkpoint folders shared between hosts/containers).
    key_file: str | None = None
    # llmuxd: CRIU dump and restore are killed after this long.
    dump_timeout_secs: float = Field(default=600, gt=0)
    restore_timeout_secs: float = Field(default=300, gt=0)


class IsolationConfig(_Strict):
    """How llmuxd isolates each model tree (llmuxd's own settings)."""

    # Each tree in its own PID namespace: CRIU restores its PIDs without any possible clash.
    pid_namespace: bool = True
    # io_uring_setup/enter/register fail with EPERM in the tree (CRIU cannot dump io_uring).
    block_io_uring: bool = True
    # TMPDIR=/tmp/llmuxd-tree-<model port>, emptied once the tree is gone (backends/scratch.py).
    own_tmpdir: bool = True


class Config(_Strict):
    models: dict[str, ModelConfig] = Field(min_length=1)
    policy: PolicyConfig = PolicyConfig()
    checkpoint: CheckpointConfig | None = None
    port: int = Field(default=3000, ge=1, le=65535)
    metrics_port: int = Field(default=0, ge=0, le=65535)  # 0: /metrics on `port` only
    vllm_command: str = Field(default="vllm", min_length=1)
    admin_port: int | None = Field(default=None, ge=1, le=65535)  # llmux's: /control on its own listener
    warmup: bool = False
    # llmuxd's own settings.
    host: str = "0.0.0.0"
    # Where admin_port listens (control API alone); loopback unless said otherwise.
    admin_host: str = "127.0.0.1"
    # The address every backend is started bound to (vLLM's --host).
    backend_host: str = "127.0.0.1"
    # Allows /control/* from non-loopback peers with `Authorization: Bearer <token>`.  Also
    # from $LLMUXD_CONTROL_TOKEN or the systemd credential `control-token` (preferred: the
    # config file need not hold a secret).
    control_token: str | None = Field(default=None, min_length=16)
    # When set, the OpenAI routes (/v1/*) need `Authorization: Bearer <one of these>`.
    api_keys: list[str] = []
    log_dir: str = "/var/log/llmuxd"
    max_request_bytes: int = Field(default=32 * 1024 * 1024, gt=0)
    max_json_depth: int = Field(default=64, ge=2, le=10000)
    # A client must have sent its whole request within this long.
    client_timeout_secs: float = Field(default=60, gt=0)
    # On stop, checkpoint the models whose process eviction is `checkpoint`, so that the next
    # container restores them (also `llmuxd serve --checkpoint-on-stop`).
    checkpoint_on_stop: bool = False
    isolation: IsolationConfig = IsolationConfig()

    # -- derived views -------------------------------------------------------------------
    def eviction_for(self, name: str) -> Eviction:
        m = self.models[name]
        if m.eviction is not None:
            return m.eviction
        if m.sleep_level is not None:
            return _LEGACY_SLEEP_LEVELS[m.sleep_level]
        if self.policy.sleep_level is not None and "eviction" not in self.policy.model_fields_set:
            return _LEGACY_SLEEP_LEVELS[self.policy.sleep_level]
        return self.policy.eviction

    def checkpoint_dir_for(self, name: str) -> Path:
        m = self.models[name]
        if m.checkpoint_path:
            return Path(m.checkpoint_path)
        base = self.checkpoint.images_dir if self.checkpoint else CheckpointConfig().images_dir
        return Path(base) / name / "images"

    def ignored_settings(self) -> list[str]:
        """llmux settings present in the file that llmuxd accepts but does not act on."""
        notes = []
        if self.policy.policy_type != "fifo":
            notes.append(f"policy.policy_type={self.policy.policy_type!r}: llmuxd schedules FIFO")
        for key in ("coalesce_window_ms", "amortization_factor", "max_wait_secs", "tick_interval_ms", "min_quantum_ms"):
            if getattr(self.policy, key) is not None:
                notes.append(f"policy.{key}: only used by llmux's cost_aware/time_slice policies")
        if self.warmup:
            notes.append("warmup: not implemented; models start on first use")
        return notes


def _problem_lines(err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        got = e.get("input")
        if e["type"] not in ("extra_forbidden", "missing") and not isinstance(got, (dict, list)) and repr(got) not in msg:
            msg += f" (got {got!r})"
        lines.append(f"{loc}: {msg}")
    return lines


def _relation_problems(data: Any) -> list[str]:
    """Checks across fields, run on the raw data so they are reported next to type errors."""
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        return []
    problems: list[str] = []
    own = {data.get("port", 3000): "llmuxd's own port"}
    for key in ("metrics_port", "admin_port"):
        if data.get(key):
            if data[key] in own:
                problems.append(f"{key}: {data[key]} is {own[data[key]]}")
            own[data[key]] = f"llmuxd's {key}"
    seen: dict[Any, str] = {}
    for name, m in data["models"].items():
        if not isinstance(name, str) or not _MODEL_NAME.match(name):
            problems.append(
                f"models.{name}: model name {name!r} is not allowed: use letters, digits, '.', '-', '_' "
                "(no leading dot, no '/'): it becomes a folder, cgroup and D-Bus name"
            )
        port = m.get("port") if isinstance(m, dict) else None
        if not isinstance(port, int) or isinstance(port, bool):
            continue
        if port in own:
            problems.append(f"models.{name}.port: {port} is {own[port]}")
        elif port in seen:
            problems.append(f"models.{name}.port: {port} is already used by model {seen[port]!r}")
        seen.setdefault(port, name)
    return problems


def parse_config(data: Any, source: str = "<config>") -> Config:
    problems = _relation_problems(data)
    try:
        config = Config.model_validate(data)
    except ValidationError as e:
        problems = _problem_lines(e) + problems
    if problems:
        raise ConfigError(source, problems)
    return config


def read_config_data(path: Path) -> Any:
    """The file's JSON, not yet validated."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(path, [f"cannot read: {e.strerror}"]) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(path, [f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"]) from None


def load_config(path: Path | str = DEFAULT_CONFIG_PATH) -> Config:
    path = Path(path)
    return parse_config(read_config_data(path), str(path))
