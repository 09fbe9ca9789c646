"""llmuxd configuration: llmux's ``config.json``, read unchanged, validated with pydantic.

Every key of llmux 0.4 to 0.9 is accepted.  Keys llmuxd does not act on (llmux's alternative
scheduling policies, warm-up) are accepted and reported once at start-up, so a config written
for llmux starts llmuxd without edits; a key for something llmuxd cannot do yet
(``checkpoint.object_store``) is accepted and warned about, never silently dropped.  A key
neither project knows is an error.
"""

from __future__ import annotations

import json
import re
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

DEFAULT_CONFIG_PATH = Path("/etc/llmux/config.json")
DEFAULT_STARTUP_TIMEOUT_SECS = 1800.0
DEFAULT_METRICS_PORT = 9090  # llmux's
DEFAULT_PORT = 3000

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
    sleep_level: int | None = Field(default=None, ge=1, le=5)  # llmux 0.4-0.5
    # llmuxd: how long this model's start (or restore) may take; default: the top-level key.
    startup_timeout_secs: float | None = Field(default=None, gt=0)
    # llmuxd: add --enable-sleep-mode?  None = when the weights axis needs it.  vLLM's CPU
    # build refuses the flag yet serves the sleep endpoints in dev mode: set false there.
    enable_sleep_mode: bool | None = None


class PolicyConfig(_Strict):
    policy_type: str = "fifo"
    request_timeout_secs: float = Field(default=300, gt=0)
    drain_before_switch: bool = True
    min_active_secs: float = Field(default=5, ge=0)
    # Where llmuxd read it before llmux 0.9 put it at the top level; either place works.
    startup_timeout_secs: float | None = Field(default=None, gt=0)
    # llmuxd: how long an eviction waits for in-flight requests; streams still open then end
    # with an SSE error frame and the switch goes on.
    drain_timeout_secs: float = Field(default=30, gt=0)
    # llmuxd: the longest silence tolerated from a backend while it answers (between two
    # chunks of a stream, or before the response starts).
    upstream_read_timeout_secs: float = Field(default=300, gt=0)
    # llmuxd: requests waiting for their model at most; more get 429 with Retry-After.
    max_queued_requests: int = Field(default=1024, ge=1)
    # llmuxd: a streaming request ("stream": true) that waits this long for its model gets its
    # response started (200, text/event-stream) and an SSE comment line every this many seconds
    # until the model serves it; 0: off (the client gets nothing until the backend answers).
    sse_keepalive_secs: float = Field(default=10, ge=0)
    eviction: Eviction = Eviction()
    sleep_level: int | None = Field(default=None, ge=1, le=5)
    # llmux's cost_aware / time_slice tuning; accepted, not acted on (llmuxd schedules FIFO).
    coalesce_window_ms: int | None = None
    amortization_factor: float | None = None
    max_wait_secs: float | None = None
    tick_interval_ms: int | None = None
    min_quantum_ms: int | None = None


class ObjectStoreConfig(_Strict):
    """llmux 0.6+'s S3-compatible store for checkpoints.  Accepted and validated as llmux does;
    llmuxd does not upload or download checkpoints yet (they stay local), and says so."""

    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"


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
    object_store: ObjectStoreConfig | None = None  # not supported yet: see unsupported_settings()


class IsolationConfig(_Strict):
    """How llmuxd isolates each model tree (llmuxd's own settings)."""

    # Each tree in its own PID namespace: CRIU restores its PIDs without any possible clash.
    pid_namespace: bool = True
    # io_uring_setup/enter/register fail with EPERM in the tree (CRIU cannot dump io_uring).
    block_io_uring: bool = True
    # TMPDIR=/tmp/llmuxd-tree-<model port>, emptied once the tree is gone (backends/scratch.py).
    own_tmpdir: bool = True


class LogsConfig(_Strict):
    """The models' output files, ``<log_dir>/<model>.log`` (llmuxd's own settings)."""

    # Once a file reaches this size, it is copied to <model>.log.1 (older copies move up to
    # .2, ...) and emptied in place (the tree keeps writing to it; see modellog.py).
    max_bytes: int = Field(default=64 * 1024 * 1024, ge=4096)
    # Rotated copies kept (0: a full file is emptied without a copy).
    keep: int = Field(default=3, ge=0, le=100)


class Config(_Strict):
    models: dict[str, ModelConfig] = Field(min_length=1)
    policy: PolicyConfig = PolicyConfig()
    checkpoint: CheckpointConfig | None = None
    port: int = Field(default=DEFAULT_PORT, ge=1, le=65535)
    # /metrics alone on its own listener (on `host`), as llmux serves it; 0: no such listener
    # (/metrics is still served on `port` and `admin_port`).
    metrics_port: int = Field(default=DEFAULT_METRICS_PORT, ge=0, le=65535)
    vllm_command: str = Field(default="vllm", min_length=1)
    admin_port: int | None = Field(default=None, ge=1, le=65535)  # llmux's: /control on its own listener
    # llmux 0.9: how long a model's start may take (health included), unless the model sets its own.
    startup_timeout_secs: float | None = Field(default=None, gt=0)
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
    logs: LogsConfig = LogsConfig()
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

    def startup_timeout_for(self, name: str) -> float:
        """How long model ``name``'s start or restore may take: its own setting, else the
        top-level one (llmux 0.9), else ``policy.startup_timeout_secs``, else 30 minutes."""
        for value in (self.models[name].startup_timeout_secs, self.startup_timeout_secs,
                      self.policy.startup_timeout_secs):
            if value is not None:
                return value
        return DEFAULT_STARTUP_TIMEOUT_SECS

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

    def unsupported_settings(self) -> list[str]:
        """llmux features the file asks for that llmuxd does not provide yet: said as a warning
        by ``check-config`` and in the log at start, never dropped silently."""
        warnings = []
        store = self.checkpoint.object_store if self.checkpoint else None
        if store is not None:  # no credentials in the message: it goes to the log
            warnings.append(f"checkpoint.object_store (bucket {store.bucket!r}): not supported yet; checkpoints are "
                            "not uploaded or downloaded, they stay local (checkpoint.images_dir, checkpoint_path)")
        return warnings


#: Keys of other llmux versions that llmuxd does not read, and what to do instead.
_OTHER_LLMUX_KEYS = {
    "gpu_memory_utilization": "llmux 0.1-0.2's; give vLLM the flag in extra_args: --gpu-memory-utilization",
    "tensor_parallel_size": "llmux 0.1-0.2's; give vLLM the flag in extra_args: --tensor-parallel-size",
    "dtype": "llmux 0.1-0.2's; give vLLM the flag in extra_args: --dtype",
    "vllm_logging": "llmux 0.1-0.2's; llmuxd always writes each backend's output to log_dir/MODEL.log",
    "wake": "llmux 2's hook scripts are not supported: llmuxd runs vLLM itself (model_path, eviction)",
    "sleep": "llmux 2's hook scripts are not supported: llmuxd runs vLLM itself (model_path, eviction)",
    "alive": "llmux 2's hook scripts are not supported: llmuxd runs vLLM itself (model_path, eviction)",
}
#: Keys whose value is a secret: a problem with one never repeats the value.
_SECRET_KEYS = {"control_token", "api_keys", "access_key", "secret_key"}


def _problem_lines(err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        secret = any(p in _SECRET_KEYS for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            hint = _OTHER_LLMUX_KEYS.get(str(e["loc"][-1]))
            msg = f"unknown key ({hint})" if hint else "unknown key"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        got = e.get("input")
        if (e["type"] not in ("extra_forbidden", "missing") and not secret and not isinstance(got, (dict, list))
                and repr(got) not in msg):
            msg += f" (got {got!r})"
        lines.append(f"{loc}: {msg}")
    return lines


def _relation_problems(data: Any) -> list[str]:
    """Checks across fields, run on the raw data so they are reported next to type errors."""
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        return []
    problems: list[str] = []
    own = {data.get("port", DEFAULT_PORT): "llmuxd's own port"}
    listeners = {"metrics_port": data.get("metrics_port", DEFAULT_METRICS_PORT), "admin_port": data.get("admin_port")}
    for key, port in listeners.items():
        if port:
            if port in own:
                problems.append(f"{key}: {port} is {own[port]}" + (" (the default; set metrics_port to another port, "
                                "or 0 for /metrics on port only)" if "metrics_port" not in data else ""))
            own[port] = f"llmuxd's {key}" + (" (the default)" if key not in data else "")
    policy = data.get("policy")
    if "startup_timeout_secs" in data and isinstance(policy, dict) and "startup_timeout_secs" in policy:
        problems.append("startup_timeout_secs: also set as policy.startup_timeout_secs; keep one (the top-level "
                        "key is llmux 0.9's)")
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
