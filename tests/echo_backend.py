"""A small hostile/inspectable backend for the HTTP security and liveness tests.

Started by llmuxd like vLLM (``vllm_command`` = this script: ``serve MODEL --port P --host H
...``).  Every request it receives is appended to ``$ECHO_BACKEND_LOG`` (JSON lines: method,
raw path, headers), so a test can prove what reached it — and what never did.  POST /v1/* does
what its ``prompt`` says:

* anything else: echo (method, raw path, headers, body) as JSON, with hop-by-hop response
  headers that must not reach the client;
* ``stall``: start an SSE stream, send one frame, then nothing, forever;
* ``stall-head``: never answer at all;
* ``slow``: one SSE frame every 0.1 s, 300 of them;
* ``flood``: SSE frames of 64 KiB as fast as they can go, 2000 of them;
* ``split``: one SSE frame written in two halves with a pause between, then [DONE].

A request that llmuxd abandons is logged as ``{"event": "disconnected", "prompt": ...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

from aiohttp import web

LOG = os.environ.get("ECHO_BACKEND_LOG")


def record(entry: dict) -> None:
    if LOG:
        with open(LOG, "a") as f:
            f.write(json.dumps({"t": time.time(), "pid": os.getpid(), **entry}) + "\n")


@web.middleware
async def log_requests(request: web.Request, handler):
    record({"method": request.method, "raw_path": request.raw_path, "headers": list(request.headers.items())})
    return await handler(request)


def frame(obj) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


async def stream(request: web.Request, prompt: str) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    try:
        if prompt == "stall":
            await resp.write(frame({"choices": [{"text": "first"}]}))
            record({"event": "stalling"})
            await asyncio.sleep(3600)
        elif prompt == "slow":
            for i in range(300):
                await resp.write(frame({"choices": [{"text": f"t{i}"}]}))
                await asyncio.sleep(0.1)
        elif prompt == "flood":
            blob = "x" * 65536
            for i in range(2000):
                await resp.write(frame({"choices": [{"text": blob}], "i": i}))
        elif prompt == "split":
            data = frame({"choices": [{"text": "whole"}]})
            await resp.write(data[:10])
            await asyncio.sleep(0.3)
            await resp.write(data[10:])
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
    except (asyncio.CancelledError, ConnectionError):
        record({"event": "disconnected", "prompt": prompt})
        raise
    return resp


async def completions(request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    try:
        body = json.loads(raw)
    except ValueError:
        body = {}
    prompt = body.get("prompt") if isinstance(body, dict) else None
    if prompt in ("stall", "slow", "flood", "split"):
        return await stream(request, prompt)
    if prompt == "stall-head":
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            record({"event": "disconnected", "prompt": prompt})
            raise
    echo = {"method": request.method, "raw_path": request.raw_path, "headers": list(request.headers.items()),
            "body": raw.decode(errors="replace")}
    headers = {"Connection": "X-Backend-Hop", "X-Backend-Hop": "must-not-pass", "Keep-Alive": "timeout=99",
               "Proxy-Authenticate": "Basic", "Trailer": "X-Trailer", "Upgrade": "h2c",
               "X-End-To-End": "passes"}
    return web.json_response(echo, headers=headers)


async def health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": n, "object": "model"} for n in request.app["names"]]})


async def anything(request: web.Request) -> web.Response:
    return web.Response(status=404, text="no such route")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("command")
    p.add_argument("model")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--served-model-name", nargs="+", default=None)
    args, _ = p.parse_known_args()
    app = web.Application(middlewares=[log_requests])
    app["names"] = args.served_model_name or [args.model]
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/{tail:.*}", completions)
    app.router.add_route("*", "/{tail:.*}", anything)
    web.run_app(app, host=args.host, port=args.port, print=None, handler_cancellation=True)


if __name__ == "__main__":
    sys.exit(main())
