"""A vLLM look-alike holding real GPU state, for llmuxd's GPU tests (``vllm_command``).

    python -m gpu.backend serve MODEL [--host H] [--port P] [--served-model-name NAME ...]
                          [--enable-sleep-mode] [--enforce-eager] [--device cuda|cpu] [other vLLM flags, ignored]
    python -m gpu.backend make-model ORG/NAME [--hf-home DIR] [--hidden N] [--layers N] [--vocab N]
                          [--window N] [--kv-bytes N] [--seed N] [--device cuda|cpu]

The process shape is vLLM's: this API server process (aiohttp; it never imports torch or touches
the GPU) spawns an engine-core child (``gpu/engine.py``) that holds the weights, a KV buffer and
a captured CUDA graph; they talk over two ZMQ ``ipc:///tmp/<uuid>`` sockets and a
``/dev/shm/psm_*`` status block.  The HTTP routes are the simulator's (``llmuxd.sim.api``):
``/health``, ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions`` (greedy,
deterministic from the weights), ``/v1/embeddings``; with ``VLLM_SERVER_DEV_MODE=1``:
``/sleep?level=``, ``/wake_up``, ``/is_sleeping``, ``/collective_rpc`` (``reload_weights``),
``/reset_prefix_cache``; plus ``GET /gpu/info[?checksum=1]`` (memory, timings, weights digest).
MODEL is a local folder or ORG/NAME in the offline HF cache (``$HF_HOME/hub``).  Without CUDA
the engine runs on CPU tensors (the tests on a machine without a GPU).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from aiohttp import web

from llmuxd.sim import model as simmodel
from llmuxd.sim.api import Api
from llmuxd.sim.client import EngineClient, EngineDeadError
from llmuxd.sim.logs import setup_logging

log = logging.getLogger("gpu.backend")


def _engine_main(cfg: Any) -> None:  # the spawned child: torch is imported only there
    from gpu.engine import run_engine

    run_engine(cfg)


class GpuEngineClient(EngineClient):
    """The simulator's engine client (ZMQ sockets, status block, request plumbing), spawning
    the GPU engine instead of the simulated one."""

    def __init__(self, *, model: str, model_path: str, served_name: str, enforce_eager: bool,
                 device: str | None) -> None:
        super().__init__(model=model, model_path=model_path, served_name=served_name, load_seconds=0,
                         token_delay=0, crash_after_tokens=None, gpu_bytes=0)
        from gpu.engine import GpuEngineConfig  # no torch at import time

        self.gpu_cfg = GpuEngineConfig(model=model, model_path=model_path, served_name=served_name,
                                       input_address=self.input_address, output_address=self.output_address,
                                       shm_name=self.shm.name, enforce_eager=enforce_eager, device=device)

    def _engine_process(self) -> tuple[Any, tuple]:
        return _engine_main, (self.gpu_cfg,)


class GpuApi(Api):
    def app(self) -> web.Application:
        app = super().app()
        app.router.add_get("/gpu/info", self.gpu_info)
        return app

    async def gpu_info(self, request: web.Request) -> web.Response:
        info = await self._call("gpu_info", checksum=request.query.get("checksum") == "1")
        return web.json_response({"api_pid": os.getpid(), "engine_pid": self.engine.engine_pid, **info})


def _serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gpu.backend serve")
    p.add_argument("model")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", nargs="+", default=None)
    p.add_argument("--enable-sleep-mode", action="store_true")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--device", default=None, choices=("cuda", "cpu"))
    return p


async def _serve(args: argparse.Namespace, path: str, served: list[str], sock: socket.socket) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    code = 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def on_death(exit_code: int | None) -> None:
        nonlocal code
        log.error("Engine core proc EngineCore_DP0 died unexpectedly (exit code %s), shutting down API server",
                  exit_code)
        code = 1
        stop.set()

    engine = GpuEngineClient(model=args.model, model_path=path, served_name=served[0],
                             enforce_eager=args.enforce_eager, device=args.device)
    engine.on_death = on_death
    runner: web.AppRunner | None = None
    try:
        start = asyncio.create_task(engine.start())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({start, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not start.done():
            start.cancel()
            return code
        stopped.cancel()
        try:
            start.result()
        except EngineDeadError as e:
            log.error("Engine core initialization failed (%s)", e)
            return 1
        api = GpuApi(engine, served_names=served, model_path=path, sleep_allowed=args.enable_sleep_mode,
                     fail_sleep=False, never_healthy=False, dev_mode=os.environ.get("VLLM_SERVER_DEV_MODE") == "1")
        runner = web.AppRunner(api.app(), access_log_format='%a "%r" %s %b')
        await runner.setup()
        await web.SockSite(runner, sock, shutdown_timeout=1.0).start()
        log.info("Starting vLLM API server on http://%s:%d (engine pid %d)", args.host, args.port, engine.engine_pid)
        await stop.wait()
        return code
    finally:
        if runner is not None:
            await runner.cleanup()
        await engine.shutdown(timeout=10.0)
        sock.close()
        log.info("API server exiting with code %d", code)


def serve(argv: list[str]) -> int:
    args, unknown = _serve_parser().parse_known_args(argv)
    setup_logging()
    if unknown:
        log.info("Ignoring vLLM arguments this backend does not model: %s", " ".join(unknown))
    try:
        path = simmodel.resolve(args.model)
    except simmodel.ModelNotFound as e:
        log.error("%s", e)
        return 1
    served = args.served_model_name or [args.model]
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        log.error("Cannot bind %s:%d: %s", args.host, args.port, e)
        return 1
    sock.set_inheritable(False)
    log.info("GPU test backend serving %s (%s) as %s", args.model, path, served)
    return asyncio.run(_serve(args, str(path), served, sock))


def make_model_cmd(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m gpu.backend make-model")
    p.add_argument("repo_id", metavar="ORG/NAME")
    p.add_argument("--hf-home", default=None, help="default: $HF_HOME or ~/.cache/huggingface")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--kv-bytes", type=int, default=16 << 20)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--device", default=None, help="where to draw the random weights (default: cuda if present)")
    a = p.parse_args(argv)
    from gpu import model

    device = a.device or ("cuda" if model.torch.cuda.is_available() else "cpu")
    made = model.make_model(a.repo_id, Path(a.hf_home) if a.hf_home else simmodel.hf_home(), hidden=a.hidden,
                            layers=a.layers, vocab=a.vocab, window=a.window, kv_bytes=a.kv_bytes, seed=a.seed,
                            dtype=a.dtype, device=device)
    print(made.snapshot)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"serve": serve, "make-model": make_model_cmd}
    if not argv or argv[0] not in commands:
        print(__doc__.strip(), file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
