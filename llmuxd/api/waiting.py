"""What a streaming client is told while its request waits for its model.

A request with ``"stream": true`` that has waited ``policy.sse_keepalive_secs`` for its model
gets its response started — ``200``, ``text/event-stream`` — and then an SSE comment line every
``sse_keepalive_secs`` until the model serves it::

    : waiting for m2 (cold_start: load, 12 s)

SSE clients (the official ``openai`` client among them) skip comment lines; a proxy or a
client with a read timeout sees bytes flow during a long cold start.  Once the model serves
the request, the backend's event stream is relayed as it would have been (under llmuxd's status
line and headers, which went out first).  Anything else that ends the request after that point
— the backend answering with an error status or without an event stream, the switch failing,
the queue timeout, llmuxd stopping — can no longer change the status line, so it ends the stream
with one frame in OpenAI's error envelope, as an error in the middle of a stream does:
``data: {"error": {"message", "type", "param", "code"}}``.  A backend's own error keeps its
message, type and code (else ``code`` is its HTTP status).  A request that waits less than
``sse_keepalive_secs`` is answered exactly as without keep-alives."""

from __future__ import annotations

import json

from ..progress import Tracker
from .errors import envelope

SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}


def waiting_comment(tracker: Tracker, model: str, waited: float) -> bytes:
    """``: waiting for MODEL (what is happening, N s)``: the wanted model's phase and step, or
    the phase of the model being evicted for it, or ``queued``."""
    current = tracker.current()
    if (p := current.get(model)) is not None:
        what = p.label + (f": {p.step}" if p.step else "")
    elif current:
        other, p = next(iter(current.items()))
        what = f"{other} {p.label}"
    else:
        what = "queued"
    return f": waiting for {model} ({what}, {waited:.0f} s)\n\n".encode()


def upstream_error(model: str, status: int, content_type: str, body: bytes) -> dict:
    """The backend's answer that cannot be relayed into a started event stream, as OpenAI's
    error envelope: the backend's own error (OpenAI's shape, or vLLM's older flat one) when it
    sent one, else what it answered."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    inner = data.get("error") if isinstance(data, dict) else None
    source = inner if isinstance(inner, dict) else data if isinstance(data, dict) else {}
    message = source.get("message")
    if not isinstance(message, str) or not message:
        if status == 200:
            message = f"model '{model}' answered {content_type or 'without a content type'}, not an event stream"
        else:
            text = body[:200].decode("utf-8", "replace").strip()
            message = f"model '{model}' answered HTTP {status}" + (f": {text}" if text else "")
    kind = source.get("type")
    code = source.get("code")
    param = source.get("param")
    return envelope(message, kind if isinstance(kind, str) else "server_error" if status >= 500 or status == 200
                    else "invalid_request_error",
                    code if isinstance(code, (str, int)) and not isinstance(code, bool) else status,
                    param if isinstance(param, str) else None)
