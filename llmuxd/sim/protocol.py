"""Messages between the simulator's API server and its engine core, and the shared status block.

Transport (like vLLM's V1 engine): two ZMQ sockets on ``ipc:///tmp/<uuid4>`` paths, both BOUND by
the API server; the engine connects. The API server PUSHes requests on the input socket and PULLs
engine outputs from the output socket. Every message is one JSON object with a ``type`` field.

API server -> engine:
  ``{"type": "generate", "id", "prompt", "max_tokens"}``  start a generation
  ``{"type": "embed", "id", "inputs": [str, ...]}``         compute embeddings
  ``{"type": "abort", "id"}``                               drop a request (client went away)
  ``{"type": "call", "id", "method", "args": {...}}``       utility call (sleep, wake_up, ...)
  ``{"type": "shutdown"}``                                  exit cleanly
engine -> API server:
  ``{"type": "ready", "pid", "cache_file", "gpu_bytes"}``   loaded, serving
  ``{"type": "outputs", "outputs": [{"id", "text", "index", "finished", "finish_reason"}]}``
  ``{"type": "embeddings", "id", "vectors": [[float]], "prompt_tokens"}``
  ``{"type": "reply", "id", "ok": bool, "result" | "error", "kind"}``  utility call result

The status block is a ``multiprocessing.shared_memory.SharedMemory`` segment (``/dev/shm/psm_*``)
created by the API server; the engine writes its state and a heartbeat counter into it.
"""

from __future__ import annotations

import json
import struct
import tempfile
import uuid
from dataclasses import dataclass
from typing import Any

# Engine states in the status block.
STATE_STARTING = 0
STATE_LOADING = 1
STATE_READY = 2
STATE_SLEEPING = 3
STATE_DEAD = 4

STATE_NAMES = {
    STATE_STARTING: "starting",
    STATE_LOADING: "loading",
    STATE_READY: "ready",
    STATE_SLEEPING: "sleeping",
    STATE_DEAD: "dead",
}

# Error kinds in utility replies (mapped to HTTP statuses by the API server).
ERR_BAD_REQUEST = "bad_request"
ERR_OOM = "oom"
ERR_INTERNAL = "internal"

_MAGIC = b"LSIM"
_STATUS_FMT = "<4sIQQQQQ"  # magic, state, engine pid, heartbeat, tokens emitted, gpu bytes held, requests
STATUS_SIZE = 4096


def new_ipc_address() -> str:
    """A fresh ``ipc://<temporary folder>/<uuid4>`` address, as vLLM picks them (its
    ``VLLM_RPC_BASE_PATH`` defaults to ``tempfile.gettempdir()``, which honours ``TMPDIR``)."""
    return f"ipc://{tempfile.gettempdir()}/{uuid.uuid4()}"


def ipc_path(address: str) -> str:
    """The filesystem path behind an ``ipc://`` address."""
    return address.removeprefix("ipc://")


def encode(msg: dict[str, Any]) -> bytes:
    """Serialize one message."""
    return json.dumps(msg, separators=(",", ":")).encode()


def decode(data: bytes) -> dict[str, Any]:
    """Deserialize one message."""
    return json.loads(data)


@dataclass
class Status:
    """A decoded snapshot of the shared status block."""

    state: int
    engine_pid: int
    heartbeat: int
    tokens: int
    gpu_bytes: int
    requests: int

    @property
    def state_name(self) -> str:
        return STATE_NAMES.get(self.state, "unknown")


def write_status(buf: memoryview, *, state: int, engine_pid: int, heartbeat: int, tokens: int,
                 gpu_bytes: int, requests: int) -> None:
    """Write the whole status block (the engine is its only writer)."""
    struct.pack_into(_STATUS_FMT, buf, 0, _MAGIC, state, engine_pid, heartbeat, tokens, gpu_bytes,
                     requests)


def read_status(buf: memoryview) -> Status | None:
    """Read the status block; None until the engine first wrote it."""
    magic, *fields = struct.unpack_from(_STATUS_FMT, buf, 0)
    if magic != _MAGIC:
        return None
    return Status(*fields)
