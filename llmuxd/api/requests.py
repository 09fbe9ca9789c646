"""Reading client request bodies: size limit (with or without Content-Length), time limit,
JSON nesting limit, the ``model`` field."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from dataclasses import dataclass

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from ..errors import BadRequest, PayloadTooLarge, RequestTimeout

MAX_MODEL_NAME = 256
_OFF_LOOP_BYTES = 256 * 1024  # larger bodies are scanned and parsed in a thread
_KEEP = b'"[]{}'
_DELETE = bytes(b for b in range(256) if b not in _KEEP)
_FOLD = bytes.maketrans(b"{}", b"[]")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


@dataclass(frozen=True)
class BodyLimits:
    max_bytes: int
    max_depth: int = 64
    timeout_secs: float = 60.0


async def read_body(request: web.Request, limits: BodyLimits) -> bytes:
    """The whole body, within ``max_bytes`` (chunked bodies too) and ``timeout_secs``."""
    limit = limits.max_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body of {request.content_length} bytes exceeds the limit of {limit} bytes")
    content = request.content
    if content.is_eof() and content.exception() is None:  # all there already: no waiting, no timer
        body = content.read_nowait()
        if len(body) > limit:  # (a Content-Encoding decoded to more)
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        return body
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(limits.timeout_secs):
            while chunk := await request.content.readany():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {limits.timeout_secs:g} s") from None
    except (RequestPayloadError, HttpProcessingError) as e:  # bad chunked framing or Content-Encoding
        cause = e.__cause__ if isinstance(e.__cause__, HttpProcessingError) else e
        detail = " ".join(str(getattr(cause, "message", cause)).split())[:200]
        raise BadRequest(f"request body could not be read: {detail}") from None
    return b"".join(chunks)


def nesting_exceeds(body: bytes, max_depth: int) -> bool:
    """Whether the JSON text nests arrays/objects deeper than ``max_depth``, decided without
    parsing (no recursion) and in C-speed passes over the bytes, O(max_depth * size) at worst:
    escapes and strings are cut out, objects folded into arrays, then each pass removes the
    innermost empty pairs; a pair still left after ``max_depth`` passes is nested deeper."""
    text = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    brackets = text.translate(_FOLD, _DELETE).replace(b'""', b"")
    if b'"' in brackets:  # odd pieces are inside strings
        brackets = b"".join(itertools.islice(brackets.split(b'"'), 0, None, 2))
    if b"[" * (max_depth + 1) in brackets:
        return True
    for _ in range(max_depth):
        shorter = brackets.replace(b"[]", b"")
        if len(shorter) == len(brackets):  # empty, or unbalanced: json.loads says what is wrong
            return False
        brackets = shorter
    return b"[]" in brackets


def parse_model_request(body: bytes, max_depth: int = 64) -> tuple[dict, str]:
    """The JSON object and its ``model``; BadRequest when either is missing or malformed."""
    if nesting_exceeds(body, max_depth):
        raise BadRequest(f"request body nests JSON deeper than {max_depth} levels")
    try:
        data = json.loads(body.decode("utf-8"))  # UTF-8 only (JSON on the wire; and what was scanned)
    except ValueError as e:  # not JSON, not UTF-8, or a number too long to convert
        raise BadRequest(f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise BadRequest(f"request body nests JSON deeper than {max_depth} levels") from None
    if _SURROGATE_ESCAPE.search(body):  # only then can a string hold an unpaired surrogate
        try:
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest("request body contains an unpaired UTF-16 surrogate (\\ud800-\\udfff)") from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("you must provide a model parameter", param="model")
    if len(model) > MAX_MODEL_NAME:
        raise BadRequest(f"model name is longer than {MAX_MODEL_NAME} characters", param="model")
    return data, model


async def read_model_request(request: web.Request, limits: BodyLimits) -> tuple[bytes, dict, str]:
    body = await read_body(request, limits)
    if len(body) > _OFF_LOOP_BYTES:  # keep the event loop (and the watchdog) going meanwhile
        data, model = await asyncio.to_thread(parse_model_request, body, limits.max_depth)
    else:
        data, model = parse_model_request(body, limits.max_depth)
    return body, data, model
