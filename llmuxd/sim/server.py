"""``llmuxd-vllm-sim``: a vLLM look-alike (API server process + spawned engine core).

    llmuxd-vllm-sim serve MODEL [--host H] [--port P] [--served-model-name NAME ...]
                    [--enable-sleep-mode] [--sim-* ...] [other vLLM flags, ignored]
    llmuxd-vllm-sim make-model ORG/NAME --seed N [--hf-home DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from typing import Callable

from aiohttp import web

from llmuxd.sim import model
from llmuxd.sim.api import Api
from llmuxd.sim.client import EngineClient, EngineDeadError
from llmuxd.sim.logs import setup_logging

log = logging.getLogger("llmuxd.sim.server")

HTTP_SHUTDOWN_TIMEOUT = 1.0


def _serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmuxd-vllm-sim serve",
                                description="Serve a fake model like `vllm serve`.")
    p.add_argument("model", help="local model folder or ORG/NAME in the offline HF cache")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", nargs="+", default=None)
    p.add_argument("--enable-sleep-mode", action="store_true")
    p.add_argument("--sim-load-seconds", type=float, default=0.3)
    p.add_argument("--sim-token-delay", type=float, default=0.01)
    p.add_argument("--sim-never-healthy", action="store_true")
    p.add_argument("--sim-fail-sleep", action="store_true")
    p.add_argument("--sim-crash-after-tokens", type=int, default=None)
    p.add_argument("--sim-model-bytes", type=int, default=None)
    return p


def _make_model_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmuxd-vllm-sim make-model",
                                description="Write a tiny fake model into a HuggingFace cache.")
    p.add_argument("repo_id", metavar="ORG/NAME")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--hf-home", default=None, help="default: $HF_HOME or ~/.cache/huggingface")
    p.add_argument("--weights-bytes", type=int, default=model.DEFAULT_WEIGHTS_BYTES)
    p.add_argument("--gpu-bytes", type=int, default=model.DEFAULT_GPU_BYTES,
                   help="simulated GPU footprint recorded in config.json (sim_gpu_bytes)")
    return p


def _bind(host: str, port: int) -> socket.socket:
    """Reserve the port before the engine starts (like vLLM); listening starts once loaded."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(False)
    return sock


async def run_server(args: argparse.Namespace, sock: socket.socket, make_engine: Callable[[], EngineClient],
                     make_api: Callable[[EngineClient], Api], engine_stop_timeout: float | None = None) -> int:
    """The API server's life: start the engine, then serve until a signal or the engine's death,
    as vLLM does (also used by the GPU test backend, tests/gpu/backend.py, with its own engine)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    exit_code = 0

    def on_signal(signame: str) -> None:
        log.info("Received %s, shutting down", signame)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)

    def on_death(code: int | None) -> None:
        nonlocal exit_code
        log.error("Engine core proc EngineCore_DP0 died unexpectedly (exit code %s), "
                  "shutting down API server", code)
        exit_code = 1
        stop.set()

    engine = make_engine()
    engine.on_death = on_death
    runner: web.AppRunner | None = None
    try:
        start = asyncio.create_task(engine.start())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({start, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not start.done():
            start.cancel()
            return exit_code
        stopped.cancel()
        try:
            start.result()
        except EngineDeadError as e:
            log.error("Engine core initialization failed (%s). See root cause above.", e)
            exit_code = 1
            return exit_code
        runner = web.AppRunner(make_api(engine).app(), access_log_format='%a "%r" %s %b')
        await runner.setup()
        await web.SockSite(runner, sock, shutdown_timeout=HTTP_SHUTDOWN_TIMEOUT).start()
        log.info("Starting vLLM API server on http://%s:%d (engine pid %d)", args.host, args.port,
                 engine.engine_pid)
        await stop.wait()
        return exit_code
    finally:
        if runner is not None:
            await runner.cleanup()
        if engine_stop_timeout is None:
            await engine.shutdown()
        else:
            await engine.shutdown(timeout=engine_stop_timeout)
        sock.close()
        log.info("API server exiting with code %d", exit_code)


def serve_with(argv: list[str], parser: argparse.ArgumentParser, what: str,
               make_engine: Callable[[argparse.Namespace, str, list[str]], EngineClient],
               make_api: Callable[[argparse.Namespace, EngineClient, str, list[str]], Api],
               engine_stop_timeout: float | None = None) -> int:
    """``serve``: vLLM's command line, the model resolved like vLLM does, the port reserved
    before the engine starts; ``make_engine``/``make_api`` say what serves."""
    args, unknown = parser.parse_known_args(argv)
    setup_logging()
    if unknown:
        log.info("Ignoring vLLM arguments %s does not model: %s", what, " ".join(unknown))
    try:
        path = str(model.resolve(args.model))
    except model.ModelNotFound as e:
        log.error("%s", e)
        return 1
    served = args.served_model_name or [args.model]
    try:
        sock = _bind(args.host, args.port)
    except OSError as e:
        log.error("Cannot bind %s:%d: %s", args.host, args.port, e)
        return 1
    log.info("%s serving %s (%s) as %s", what, args.model, path, served)
    return asyncio.run(run_server(args, sock, lambda: make_engine(args, path, served),
                                  lambda engine: make_api(args, engine, path, served), engine_stop_timeout))


def serve(argv: list[str]) -> int:
    """``serve`` subcommand."""

    def engine(args: argparse.Namespace, path: str, served: list[str]) -> EngineClient:
        return EngineClient(model=args.model, model_path=path, served_name=served[0],
                            load_seconds=args.sim_load_seconds, token_delay=args.sim_token_delay,
                            crash_after_tokens=args.sim_crash_after_tokens, gpu_bytes=args.sim_model_bytes)

    def api(args: argparse.Namespace, engine: EngineClient, path: str, served: list[str]) -> Api:
        return Api(engine, served_names=served, model_path=path,
                   sleep_allowed=args.enable_sleep_mode or os.environ.get("LLMUXD_SIM_CPU_LIKE") == "1",
                   fail_sleep=args.sim_fail_sleep, never_healthy=args.sim_never_healthy,
                   dev_mode=os.environ.get("VLLM_SERVER_DEV_MODE") == "1")

    return serve_with(argv, _serve_parser(), "the vLLM simulator", engine, api)


def make_model_cmd(argv: list[str]) -> int:
    """``make-model`` subcommand."""
    args = _make_model_parser().parse_args(argv)
    made = model.make_model(args.repo_id, args.seed, args.hf_home, weights_bytes=args.weights_bytes,
                            gpu_bytes=args.gpu_bytes)
    print(made.snapshot)
    return 0


def run_subcommand(argv: list[str] | None, commands: dict[str, Callable[[list[str]], int]], usage: str) -> int:
    """``PROG COMMAND ARGS...``: run the command, or print the usage."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in commands:
        print(usage.strip(), file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return commands[argv[0]](argv[1:])


def main(argv: list[str] | None = None) -> int:
    """Console entry point."""
    return run_subcommand(argv, {"serve": serve, "make-model": make_model_cmd}, __doc__)


if __name__ == "__main__":
    sys.exit(main())
