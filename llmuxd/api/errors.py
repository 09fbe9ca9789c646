"""The one place where domain errors become HTTP responses (OpenAI's error envelope)."""

from __future__ import annotations

import logging

from aiohttp import web

from ..errors import LlmuxdError, PayloadTooLarge

log = logging.getLogger(__name__)


def envelope(message: str, type_: str, code: str | int | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc: LlmuxdError) -> web.Response:
    headers = {"Retry-After": str(exc.retry_after_secs)} if exc.retry_after_secs else {}
    if exc.http_status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    resp = web.json_response(envelope(exc.message, exc.openai_type, exc.code, getattr(exc, "param", None)),
                             status=exc.http_status, headers=headers)
    if exc.http_status in (408, 413):  # the body was not read: the connection cannot be reused
        resp.force_close()
    return resp


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
