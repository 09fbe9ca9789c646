"""The simulator's HTTP routes: vLLM's OpenAI-compatible API plus its dev-mode endpoints."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import Any

from aiohttp import web

from llmuxd.sim import model, protocol
from llmuxd.sim.client import EngineCallError, EngineClient, EngineDeadError

log = logging.getLogger("llmuxd.sim.server")

DEFAULT_MAX_TOKENS = 16
MAX_MODEL_LEN = 2048
VERSION = "0.32.0+sim"
RPC_METHODS = ("reload_weights",)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """An error answered with OpenAI's error envelope."""

    TYPES = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError",
             503: "ServiceUnavailableError"}

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def response(self) -> web.Response:
        return web.json_response({"error": {
            "message": self.message, "type": self.TYPES.get(self.status, "Error"),
            "param": self.param, "code": self.status}}, status=self.status)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as e:
        return e.response()
    except EngineDeadError as e:
        return ApiError(500, f"EngineDeadError: {e}").response()


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"Invalid JSON body: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object")
    return body


def _max_tokens(body: dict[str, Any], prompt_tokens: int, *keys: str) -> int:
    value = next((body[k] for k in keys if body.get(k) is not None), DEFAULT_MAX_TOKENS)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ApiError(400, f"{keys[0]} must be a positive integer", keys[0])
    if prompt_tokens + value > MAX_MODEL_LEN:
        raise ApiError(400, f"This model's maximum context length is {MAX_MODEL_LEN} tokens. "
                            f"However, you requested {prompt_tokens + value} tokens.", keys[0])
    return value


def _texts(value: Any, param: str) -> list[str]:
    """Normalize a prompt/input field (str, [str], [int], [[int]]) to a list of strings."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(x, int) for x in value):
            return [" ".join(map(str, value))]
        if all(isinstance(x, str) for x in value):
            return list(value)
        if all(isinstance(x, list) and all(isinstance(t, int) for t in x) for x in value):
            return [" ".join(map(str, x)) for x in value]
    raise ApiError(400, f"Invalid {param}", param)


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


def _usage(prompt: int, completion: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "total_tokens": prompt + completion,
            "completion_tokens": completion, "prompt_tokens_details": None}


class Api:
    """Routes bound to one engine client."""

    def __init__(self, engine: EngineClient, *, served_names: list[str], model_path: str,
                 sleep_allowed: bool, fail_sleep: bool, never_healthy: bool,
                 dev_mode: bool) -> None:
        self.engine = engine
        self.served_names = served_names
        self.model_path = model_path
        self.sleep_allowed = sleep_allowed
        self.fail_sleep = fail_sleep
        self.never_healthy = never_healthy
        self.dev_mode = dev_mode
        self.created = int(time.time())

    def app(self) -> web.Application:
        app = web.Application(middlewares=[_errors])
        r = app.router
        r.add_get("/health", self.health)
        r.add_get("/ping", self.health)
        r.add_get("/version", self.version)
        r.add_get("/v1/models", self.models)
        r.add_post("/v1/chat/completions", self.chat)
        r.add_post("/v1/completions", self.completions)
        r.add_post("/v1/embeddings", self.embeddings)
        r.add_get("/sim/info", self.sim_info)
        if self.dev_mode:
            r.add_post("/sleep", self.sleep)
            r.add_post("/wake_up", self.wake_up)
            r.add_get("/is_sleeping", self.is_sleeping)
            r.add_post("/collective_rpc", self.collective_rpc)
            r.add_post("/reset_prefix_cache", self.reset_prefix_cache)
        return app

    # -- plain endpoints ---------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        st = self.engine.status()
        ok = (not self.never_healthy and self.engine.alive() and st is not None
              and st.state in (protocol.STATE_READY, protocol.STATE_SLEEPING))
        return web.Response(status=200 if ok else 503)

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": VERSION})

    async def models(self, request: web.Request) -> web.Response:
        data = [{"id": name, "object": "model", "created": self.created, "owned_by": "vllm",
                 "root": self.model_path, "parent": None, "max_model_len": MAX_MODEL_LEN,
                 "permission": []} for name in self.served_names]
        return web.json_response({"object": "list", "data": data})

    async def sim_info(self, request: web.Request) -> web.Response:
        st = self.engine.status()
        return web.json_response({
            "api_pid": os.getpid(), "engine_pid": self.engine.engine_pid,
            "ipc_paths": self.engine.ipc_paths, "shm_name": self.engine.shm.name,
            "cache_file": self.engine.info.get("cache_file"),
            "gpu_bytes": self.engine.info.get("gpu_bytes"),
            "state": st.state_name if st else None, "heartbeat": st.heartbeat if st else None,
            "tokens": st.tokens if st else None})

    def _model(self, body: dict[str, Any]) -> str:
        name = body.get("model")
        if name is None:
            return self.served_names[0]
        if name not in self.served_names:
            raise ApiError(404, f"The model `{name}` does not exist.", "model")
        return name

    # -- generation ----------------------------------------------------------------------------
    async def _stream(self, request: web.Request, jobs: list[tuple[str, int]],
                      chunk: Callable[[int, str | None, str | None], dict[str, Any]],
                      first: list[dict[str, Any]], usage_chunk: Callable[[int], dict[str, Any]] | None) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        completion = 0
        try:
            for frame in first:
                await resp.write(_sse(frame))
            for index, (prompt, max_tokens) in enumerate(jobs):
                sent = 0
                async with aclosing(self.engine.generate(prompt, max_tokens)) as gen:
                    async for tok in gen:
                        sent += 1
                        last = sent == max_tokens
                        await resp.write(_sse(chunk(index, tok, "length" if last else None)))
                completion += sent
            if usage_chunk is not None:
                await resp.write(_sse(usage_chunk(completion)))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except EngineDeadError:
            log.error("Engine died during a streamed request; closing the connection")
            if request.transport is not None:
                request.transport.abort()
        except ConnectionError:
            log.info("Client disconnected; request aborted")
        return resp

    async def _collect(self, prompt: str, max_tokens: int) -> str:
        parts = []
        async with aclosing(self.engine.generate(prompt, max_tokens)) as gen:
            async for tok in gen:
                parts.append(tok)
        return "".join(parts)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await _body(request)
        name = self._model(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) for m in messages):
            raise ApiError(400, "messages must be a non-empty list of message objects", "messages")
        prompt = model.render_chat(messages)
        ptoks = model.count_tokens(prompt)
        max_tokens = _max_tokens(body, ptoks, "max_completion_tokens", "max_tokens")
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name}
        if body.get("stream"):
            def chunk(index: int, tok: str | None, finish: str | None) -> dict[str, Any]:
                return {**base, "choices": [{"index": index, "delta": {"content": tok},
                                             "logprobs": None, "finish_reason": finish}]}

            first = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                           "logprobs": None, "finish_reason": None}]}]
            opts = body.get("stream_options") or {}
            usage = (lambda c: {**base, "choices": [], "usage": _usage(ptoks, c)}) \
                if opts.get("include_usage") else None
            return await self._stream(request, [(prompt, max_tokens)], chunk, first, usage)
        text = await self._collect(prompt, max_tokens)
        return web.json_response({
            "id": rid, "object": "chat.completion", "created": created, "model": name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text,
                                                 "reasoning_content": None, "tool_calls": []},
                         "logprobs": None, "finish_reason": "length", "stop_reason": None}],
            "usage": _usage(ptoks, max_tokens), "prompt_logprobs": None})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await _body(request)
        name = self._model(body)
        prompts = _texts(body.get("prompt"), "prompt")
        ptoks = sum(model.count_tokens(p) for p in prompts)
        max_tokens = _max_tokens(body, max(model.count_tokens(p) for p in prompts), "max_tokens")
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "text_completion", "created": created, "model": name}
        jobs = [(p, max_tokens) for p in prompts]
        if body.get("stream"):
            def chunk(index: int, tok: str | None, finish: str | None) -> dict[str, Any]:
                return {**base, "choices": [{"index": index, "text": tok, "logprobs": None,
                                             "finish_reason": finish, "stop_reason": None}]}

            opts = body.get("stream_options") or {}
            usage = (lambda c: {**base, "choices": [], "usage": _usage(ptoks, c)}) \
                if opts.get("include_usage") else None
            return await self._stream(request, jobs, chunk, [], usage)
        texts = [await self._collect(p, n) for p, n in jobs]
        return web.json_response({
            "id": rid, "object": "text_completion", "created": created, "model": name,
            "choices": [{"index": i, "text": t, "logprobs": None, "finish_reason": "length",
                         "stop_reason": None, "prompt_logprobs": None} for i, t in enumerate(texts)],
            "usage": _usage(ptoks, max_tokens * len(texts))})

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await _body(request)
        name = self._model(body)
        inputs = _texts(body.get("input"), "input")
        vectors, ptoks = await self.engine.embed(inputs)
        return web.json_response({
            "id": f"embd-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
            "model": name,
            "data": [{"index": i, "object": "embedding", "embedding": v}
                     for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": ptoks, "total_tokens": ptoks, "completion_tokens": 0,
                      "prompt_tokens_details": None}})

    # -- dev-mode endpoints ---------------------------------------------------------------------
    async def _call(self, method: str, **args: Any) -> Any:
        try:
            return await self.engine.call(method, **args)
        except EngineCallError as e:
            if e.kind == protocol.ERR_BAD_REQUEST:
                raise ApiError(400, str(e)) from None
            raise ApiError(500, str(e)) from None

    def _check_sleep_mode(self) -> None:
        if not self.sleep_allowed:
            raise ApiError(400, "Sleep mode is not enabled. Start the server with "
                                "--enable-sleep-mode to use /sleep and /wake_up.")

    async def sleep(self, request: web.Request) -> web.Response:
        self._check_sleep_mode()
        level = request.query.get("level", "1")
        if level not in ("1", "2"):
            raise ApiError(400, f"Invalid sleep level {level!r}; expected 1 or 2", "level")
        if self.fail_sleep:
            raise ApiError(500, "Simulated sleep failure (--sim-fail-sleep)")
        await self._call("sleep", level=int(level))
        log.info("Engine is sleeping (level %s)", level)
        return web.Response(status=200)

    async def wake_up(self, request: web.Request) -> web.Response:
        self._check_sleep_mode()
        tags = request.query.getall("tags", None)
        await self._call("wake_up", tags=tags)
        return web.Response(status=200)

    async def is_sleeping(self, request: web.Request) -> web.Response:
        return web.json_response({"is_sleeping": bool(await self._call("is_sleeping"))})

    async def collective_rpc(self, request: web.Request) -> web.Response:
        body = await _body(request)
        method = body.get("method")
        if not isinstance(method, str) or not method:
            raise ApiError(400, "Missing 'method' in request body", "method")
        if method not in RPC_METHODS:
            raise ApiError(400, f"Worker has no method {method!r} (simulated: {RPC_METHODS})",
                           "method")
        return web.json_response({"results": [await self._call(method)]})

    async def reset_prefix_cache(self, request: web.Request) -> web.Response:
        await self._call("reset_prefix_cache")
        return web.Response(status=200)
