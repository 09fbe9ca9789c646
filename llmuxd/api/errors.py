"""The one place where domain errors become HTTP responses (OpenAI's error envelope)."""

from __future__ import annotations

import logging

from aiohttp import web

from ..errors import (
    BackendDied, BadRequest, LlmuxdError, NotSupported, PayloadTooLarge, QueueTimeout, ShuttingDown,
    SwitchFailed, TransitionFailed, UnknownModel,
)

log = logging.getLogger(__name__)

# error class -> (HTTP status, OpenAI error type)
_STATUS: dict[type[LlmuxdError], tuple[int, str]] = {
    BadRequest: (400, "invalid_request_error"),
    PayloadTooLarge: (413, "invalid_request_error"),
    UnknownModel: (404, "invalid_request_error"),
    SwitchFailed: (503, "server_error"),
    ShuttingDown: (503, "server_error"),
    QueueTimeout: (504, "timeout_error"),
    BackendDied: (502, "server_error"),
    TransitionFailed: (500, "server_error"),
    NotSupported: (501, "server_error"),
}


def envelope(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc: LlmuxdError) -> web.Response:
    status, type_ = _STATUS.get(type(exc), (500, "server_error"))
    param = getattr(exc, "param", None) or ("model" if isinstance(exc, UnknownModel) else None)
    headers = {}
    retry_after = getattr(exc, "retry_after_secs", None)
    if retry_after:
        headers["Retry-After"] = str(retry_after)
    return web.json_response(envelope(exc.message, type_, exc.code, param), status=status, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except LlmuxdError as e:
        return error_response(e)
    except web.HTTPRequestEntityTooLarge as e:
        return error_response(PayloadTooLarge(f"request body too large: {e.text}"))
    except web.HTTPException as e:
        if e.status < 400:
            raise
        type_ = "invalid_request_error" if e.status < 500 else "server_error"
        return web.json_response(envelope(e.reason, type_, None), status=e.status, headers={
            k: v for k, v in e.headers.items() if k.lower() == "allow"
        })
    except Exception:
        log.exception("unhandled error serving %s %s", request.method, request.path)
        return web.json_response(envelope("internal error in llmuxd", "server_error", "internal_error"), status=500)
