"""Reading client request bodies: size limit, JSON, the ``model`` field."""

from __future__ import annotations

import json

from aiohttp import web

from ..errors import BadRequest, PayloadTooLarge


async def read_body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body of {request.content_length} bytes exceeds the limit of {limit} bytes")
    body = await request.content.read(limit + 1)
    if len(body) > limit:
        raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
    return body


def parse_model_request(body: bytes) -> tuple[dict, str]:
    """The JSON object and its ``model``; BadRequest when either is missing or malformed."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("you must provide a model parameter", param="model")
    return data, model


async def read_model_request(request: web.Request, limit: int) -> tuple[bytes, dict, str]:
    body = await read_body(request, limit)
    data, model = parse_model_request(body)
    return body, data, model
