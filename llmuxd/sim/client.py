"""The API server's side of the engine: spawns it, owns the ZMQ sockets and the status block."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import uuid
from collections.abc import AsyncIterator, Callable
from multiprocessing import shared_memory
from typing import Any

import zmq
import zmq.asyncio

from llmuxd.sim import protocol
from llmuxd.sim.engine import EngineConfig, run_engine

log = logging.getLogger("llmuxd.sim.server")


class EngineDeadError(Exception):
    """The engine core process died."""


class EngineCallError(Exception):
    """A utility call failed in the engine; ``kind`` is one of protocol.ERR_*."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


_DEAD = object()


class EngineClient:
    """Starts one engine core (spawn), talks to it over ZMQ ipc sockets it binds itself."""

    def __init__(self, *, model: str, model_path: str, served_name: str, load_seconds: float,
                 token_delay: float, crash_after_tokens: int | None,
                 gpu_bytes: int | None) -> None:
        self.shm = shared_memory.SharedMemory(create=True, size=protocol.STATUS_SIZE)
        # A named semaphore, as vLLM's spawn-context objects make: glibc maps it under a temporary
        # name it unlinks (``sem.XXXXXX (deleted)``) while the real ``sem.mp-*`` stays, so a dump
        # makes a CRIU link_remap.N, and a killed tree leaves the name behind.
        self.lock = multiprocessing.get_context("spawn").Lock()
        self.ctx = zmq.asyncio.Context(io_threads=1)
        self.input_address = protocol.new_ipc_address()
        self.output_address = protocol.new_ipc_address()
        self.inp = self.ctx.socket(zmq.PUSH)
        self.inp.setsockopt(zmq.LINGER, 0)
        self.inp.bind(self.input_address)
        self.out = self.ctx.socket(zmq.PULL)
        self.out.setsockopt(zmq.LINGER, 0)
        self.out.bind(self.output_address)
        self.cfg = EngineConfig(
            model=model, model_path=model_path, served_name=served_name,
            input_address=self.input_address, output_address=self.output_address,
            shm_name=self.shm.name, load_seconds=load_seconds, token_delay=token_delay,
            crash_after_tokens=crash_after_tokens, gpu_bytes=gpu_bytes)
        self.proc: multiprocessing.process.BaseProcess | None = None
        self.ready: asyncio.Future[dict[str, Any]] | None = None
        self.info: dict[str, Any] = {}
        self.dead = False
        self.stopping = False
        self.on_death: Callable[[int | None], None] | None = None
        self._streams: dict[str, asyncio.Queue[Any]] = {}
        self._calls: dict[str, asyncio.Future[Any]] = {}
        self._reader: asyncio.Task[None] | None = None

    @property
    def ipc_paths(self) -> list[str]:
        return [protocol.ipc_path(self.input_address), protocol.ipc_path(self.output_address)]

    @property
    def engine_pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def status(self) -> protocol.Status | None:
        return protocol.read_status(self.shm.buf)

    def alive(self) -> bool:
        return not self.dead and self.proc is not None and self.proc.exitcode is None

    # -- life cycle --------------------------------------------------------------------------
    async def start(self) -> dict[str, Any]:
        """Spawn the engine and wait until it is loaded; raise EngineDeadError if it dies."""
        loop = asyncio.get_running_loop()
        self.ready = loop.create_future()
        self._reader = asyncio.create_task(self._read_outputs())
        target, args = self._engine_process()
        self.proc = multiprocessing.get_context("spawn").Process(
            target=target, args=args, name="EngineCore_DP0", daemon=False)
        self.proc.start()
        log.info("Started engine core process (pid=%d)", self.proc.pid)
        loop.add_reader(self.proc.sentinel, self._on_exit)
        self.info = await self.ready
        return self.info

    def _engine_process(self) -> tuple[Any, tuple]:
        """What the engine-core process runs (a subclass may run another engine)."""
        return run_engine, (self.cfg,)

    def _on_exit(self) -> None:
        assert self.proc is not None
        asyncio.get_running_loop().remove_reader(self.proc.sentinel)
        # The sentinel can fire before the child is reapable: wait for its exit status, or
        # shutdown() would take it for alive and block sending to an engine that is gone.
        self.proc.join(2.0)
        code = self.proc.exitcode
        self.dead = True
        if self.ready and not self.ready.done():
            self.ready.set_exception(EngineDeadError(f"engine core exited with code {code}"))
        for q in self._streams.values():
            q.put_nowait(_DEAD)
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(EngineDeadError("engine core died"))
        if not self.stopping and self.on_death:
            self.on_death(code)

    async def _read_outputs(self) -> None:
        while True:
            msg = protocol.decode(await self.out.recv())
            kind = msg["type"]
            if kind == "outputs":
                for o in msg["outputs"]:
                    q = self._streams.get(o["id"])
                    if q is not None:
                        q.put_nowait(o)
            elif kind in ("reply", "embeddings"):
                fut = self._calls.get(msg["id"])
                if fut is not None and not fut.done():
                    fut.set_result(msg)
            elif kind == "ready" and self.ready and not self.ready.done():
                self.ready.set_result(msg)

    async def shutdown(self, timeout: float = 2.0) -> None:
        """Stop the engine (politely, then by signal) and free sockets and the status block."""
        self.stopping = True
        if self.proc is not None and self.proc.exitcode is None:
            asyncio.get_running_loop().remove_reader(self.proc.sentinel)
            try:
                await self.inp.send(protocol.encode({"type": "shutdown"}))
            except zmq.ZMQError:
                pass
            for action, wait in ((None, timeout), ("terminate", 1.0), ("kill", 1.0)):
                if action:
                    log.warning("Engine core did not stop; sending %s", action)
                    getattr(self.proc, action)()
                deadline = asyncio.get_running_loop().time() + wait
                while self.proc.exitcode is None and asyncio.get_running_loop().time() < deadline:
                    await asyncio.sleep(0.02)
                if self.proc.exitcode is not None:
                    break
        if self._reader:
            self._reader.cancel()
        self.inp.close(0)
        self.out.close(0)
        self.ctx.term()
        for path in self.ipc_paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self.shm.close()
        try:
            self.shm.unlink()
        except FileNotFoundError:
            pass

    # -- requests ----------------------------------------------------------------------------
    async def _send(self, msg: dict[str, Any]) -> None:
        if not self.alive():
            raise EngineDeadError("engine core is not running")
        await self.inp.send(protocol.encode(msg))

    async def generate(self, prompt: str, max_tokens: int) -> AsyncIterator[str]:
        """Yield the completion's tokens; raise EngineDeadError if the engine dies meanwhile."""
        rid = uuid.uuid4().hex
        q: asyncio.Queue[Any] = asyncio.Queue()
        self._streams[rid] = q
        finished = False
        try:
            await self._send({"type": "generate", "id": rid, "prompt": prompt,
                              "max_tokens": max_tokens})
            while not finished:
                item = await q.get()
                if item is _DEAD:
                    raise EngineDeadError("engine core died")
                finished = item["finished"]
                yield item["text"]
        finally:
            del self._streams[rid]
            if not finished and self.alive():
                try:
                    await self.inp.send(protocol.encode({"type": "abort", "id": rid}))
                except zmq.ZMQError:
                    pass

    async def _request(self, msg: dict[str, Any]) -> dict[str, Any]:
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._calls[msg["id"]] = fut
        try:
            await self._send(msg)
            return await fut
        finally:
            del self._calls[msg["id"]]

    async def embed(self, inputs: list[str]) -> tuple[list[list[float]], int]:
        """Embedding vectors and the prompt token count."""
        reply = await self._request({"type": "embed", "id": uuid.uuid4().hex, "inputs": inputs})
        return reply["vectors"], reply["prompt_tokens"]

    async def call(self, method: str, **args: Any) -> Any:
        """A utility call (sleep, wake_up, is_sleeping, reload_weights, reset_prefix_cache)."""
        reply = await self._request({"type": "call", "id": uuid.uuid4().hex, "method": method,
                                     "args": args})
        if not reply["ok"]:
            raise EngineCallError(reply["error"], reply["kind"])
        return reply.get("result")
