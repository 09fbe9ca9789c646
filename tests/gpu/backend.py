"""A vLLM look-alike holding real GPU state, for llmuxd's GPU tests (``vllm_command``).

    python -m gpu.backend serve MODEL [--host H] [--port P] [--served-model-name NAME ...]
                          [--enable-sleep-mode] [--enforce-eager] [--device cuda|cpu] [other vLLM flags, ignored]
    python -m gpu.backend make-model ORG/NAME [--hf-home DIR] [--hidden N] [--layers N] [--vocab N]
                          [--window N] [--kv-bytes N] [--seed N] [--device cuda|cpu]

The process shape is vLLM's: this API server process (aiohttp; it never imports torch or touches
the GPU) spawns an engine-core child (``tests/gpu/engine.py``) that holds the weights, a KV buffer and
a captured CUDA graph; they talk over two ZMQ ``ipc:///tmp/<uuid>`` sockets and a
``/dev/shm/psm_*`` status block.  The HTTP routes are the simulator's (``llmuxd.sim.api``):
``/health``, ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions`` (greedy,
deterministic from the weights), ``/v1/embeddings``; with ``VLLM_SERVER_DEV_MODE=1``:
``/sleep?level=``, ``/wake_up``, ``/is_sleeping``, ``/collective_rpc`` (``reload_weights``),
``/reset_prefix_cache``; plus ``GET /gpu/info[?checksum=1]`` (memory, timings, weights digest).
MODEL is a local folder or ORG/NAME in the offline HF cache (``$HF_HOME/hub``).  Without CUDA
the engine runs on CPU tensors (the tests on a machine without a GPU).  ``gpu`` is this folder,
tests/gpu: tests/ must be on the Python path (``PYTHONPATH=tests``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from aiohttp import web

from llmuxd.sim import model as simmodel
from llmuxd.sim.api import Api
from llmuxd.sim.client import EngineClient
from llmuxd.sim.server import run_subcommand, serve_with

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


def serve(argv: list[str]) -> int:
    def engine(args: argparse.Namespace, path: str, served: list[str]) -> GpuEngineClient:
        return GpuEngineClient(model=args.model, model_path=path, served_name=served[0],
                               enforce_eager=args.enforce_eager, device=args.device)

    def api(args: argparse.Namespace, engine: EngineClient, path: str, served: list[str]) -> GpuApi:
        return GpuApi(engine, served_names=served, model_path=path, sleep_allowed=args.enable_sleep_mode,
                      fail_sleep=False, never_healthy=False, dev_mode=os.environ.get("VLLM_SERVER_DEV_MODE") == "1")

    return serve_with(argv, _serve_parser(), "the GPU test backend", engine, api, engine_stop_timeout=10.0)


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
    return run_subcommand(argv, {"serve": serve, "make-model": make_model_cmd}, __doc__)


if __name__ == "__main__":
    sys.exit(main())
