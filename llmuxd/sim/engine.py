"""The simulated engine core: a spawned child of the API server (like vLLM's EngineCore)."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmuxd.sim import gpu, model, protocol
from llmuxd.sim.compile_cache import CorruptCache, KernelCache
from llmuxd.sim.core import EngineCore, EngineCoreConfig, run_engine_core

log = logging.getLogger("llmuxd.sim.engine")

ALL_TAGS = ("weights", "kv_cache")


@dataclass
class EngineConfig(EngineCoreConfig):
    """Everything the simulated engine needs."""

    load_seconds: float
    token_delay: float
    crash_after_tokens: int | None
    gpu_bytes: int | None


@dataclass
class _Request:
    id: str
    prompt: str
    max_tokens: int
    tokens: list[str] | None = None
    sent: int = 0


@dataclass
class _State:
    weights: list[bytearray] | None = None
    host_copy: list[bytes] | None = None
    sizes: list[int] = field(default_factory=list)
    digest: bytes = b""
    asleep: set[str] = field(default_factory=set)


class Engine(EngineCore):
    """Loads the weights, holds the GPU lease, runs requests token by token."""

    def __init__(self, cfg: EngineConfig) -> None:
        self.footprint = model.gpu_footprint(Path(cfg.model_path), cfg.gpu_bytes)
        super().__init__(cfg)
        self.st = _State()
        self.running: dict[str, _Request] = {}
        self.waiting_embeds: list[dict[str, Any]] = []
        self.gpu_lock = threading.Lock()
        self.lease_held = False
        self.lease_start: int | None = None
        self.kernels: KernelCache | None = None

    # -- status block and background checks ------------------------------------------------
    def _usage(self) -> tuple[int, int]:
        return (self.footprint if self.lease_held else 0), len(self.running)

    def _release(self) -> None:
        self._release_gpu()

    def _tick(self, n: int) -> None:
        """Re-take a lease lost to a CRIU restore."""
        if n % 3 == 0 and self.lease_held:
            with self.gpu_lock:
                gpu.heartbeat()
        if n % 5 == 0 and self.lease_held and gpu.self_start_time() != self.lease_start:
            # Restored from a checkpoint: the old lease stopped counting when the dumped
            # process died. Take the GPU memory again (touching the lease dir only now).
            with self.gpu_lock:
                log.warning("Process was restored; re-acquiring %d bytes of GPU memory",
                            self.footprint)
                try:
                    gpu.acquire(self.footprint, self.cfg.served_name)
                except gpu.OutOfMemory as e:
                    log.error("torch.OutOfMemoryError: %s", e)
                    os._exit(1)
                self.lease_start = gpu.self_start_time()

    # -- GPU lease ---------------------------------------------------------------------------
    def _acquire_gpu(self) -> None:
        with self.gpu_lock:
            gpu.acquire(self.footprint, self.cfg.served_name)
            self.lease_held = True
            self.lease_start = gpu.self_start_time()

    def _release_gpu(self) -> None:
        with self.gpu_lock:
            self.lease_held = False
            gpu.release()

    # -- weights ---------------------------------------------------------------------------
    def _set_weights(self, weights: list[bytearray]) -> None:
        self.st.weights = weights
        self.st.sizes = [len(w) for w in weights]
        self.st.digest = model.weights_digest(weights)

    def load(self) -> None:
        t0 = time.monotonic()
        log.info("Loading model %s from %s", self.cfg.model, self.path)
        try:
            self._acquire_gpu()
        except gpu.OutOfMemory as e:
            log.error("torch.OutOfMemoryError: %s", e)
            raise SystemExit(1)
        config_bytes = (self.path / "config.json").read_bytes()
        self.kernels = KernelCache(self.cfg.model, config_bytes)
        self._set_weights(model.read_weights(self.path))
        rest = self.cfg.load_seconds - (time.monotonic() - t0)
        if rest > 0:
            time.sleep(rest)
        log.info("Model loading took %.2f s; GPU memory: %d bytes", time.monotonic() - t0,
                 self.footprint)
        self.state = protocol.STATE_READY
        self._publish()
        self._send({"type": "ready", "pid": self.pid, "cache_file": str(self.kernels.path),
                    "gpu_bytes": self.footprint})

    # -- utility calls -----------------------------------------------------------------------
    def _sleep(self, level: int) -> None:
        if self.st.asleep:
            return
        weights = self.st.weights or []
        self.st.host_copy = [bytes(w) for w in weights] if level == 1 else None
        self.st.weights = None
        self.st.asleep = set(ALL_TAGS)
        self._release_gpu()
        self.state = protocol.STATE_SLEEPING
        log.info("Sleep level %d: GPU memory released (%s)", level,
                 "weights offloaded to CPU" if level == 1 else "weights discarded")

    def _wake(self, tags: list[str] | None) -> None:
        wake = set(tags or ALL_TAGS) & self.st.asleep
        if not wake:
            return
        if not self.lease_held:
            self._acquire_gpu()  # OutOfMemory propagates: still asleep
        if "weights" in wake:
            if self.st.host_copy is not None:
                self._set_weights([bytearray(b) for b in self.st.host_copy])
            else:  # level 2: fresh, uninitialized memory (reload_weights needed)
                self._set_weights([bytearray(n) for n in self.st.sizes])
            self.st.host_copy = None
        self.st.asleep -= wake
        if not self.st.asleep:
            self.state = protocol.STATE_READY
        log.info("Woke up %s", sorted(wake))

    def _reload_weights(self) -> None:
        if "weights" in self.st.asleep:
            raise ValueError("cannot reload weights while the weights are asleep")
        self._set_weights(model.read_weights(self.path))
        log.info("Reloaded weights from %s", self.path)

    def _call(self, msg: dict[str, Any]) -> None:
        method, args = msg.get("method"), msg.get("args") or {}
        try:
            if method == "sleep":
                self._sleep(int(args.get("level", 1)))
                result: Any = None
            elif method == "wake_up":
                self._wake(args.get("tags"))
                result = None
            elif method == "is_sleeping":
                result = bool(self.st.asleep)
            elif method == "reload_weights":
                self._reload_weights()
                result = None
            elif method == "reset_prefix_cache":
                result = True
            else:
                raise ValueError(f"unknown method {method!r}")
        except gpu.OutOfMemory as e:
            log.error("torch.OutOfMemoryError: %s", e)
            self._send({"type": "reply", "id": msg["id"], "ok": False, "error": str(e),
                        "kind": protocol.ERR_OOM})
        except ValueError as e:
            self._send({"type": "reply", "id": msg["id"], "ok": False, "error": str(e),
                        "kind": protocol.ERR_BAD_REQUEST})
        else:
            self._send({"type": "reply", "id": msg["id"], "ok": True, "result": result})
        self._publish()

    # -- requests ------------------------------------------------------------------------------
    def _check_kernels(self) -> None:
        try:
            assert self.kernels is not None
            self.kernels.check()
        except CorruptCache as e:
            log.critical("Fatal error in engine core: %s", e)
            os._exit(1)

    def _embed(self, msg: dict[str, Any]) -> None:
        self._check_kernels()
        inputs = msg["inputs"]
        self._send({"type": "embeddings", "id": msg["id"],
                    "vectors": [model.embed(self.st.digest, t) for t in inputs],
                    "prompt_tokens": sum(model.count_tokens(t) for t in inputs)})

    def _handle(self, msg: dict[str, Any]) -> None:
        kind = msg["type"]
        if kind == "generate":
            self._check_kernels()
            self.running[msg["id"]] = _Request(msg["id"], msg["prompt"], int(msg["max_tokens"]))
        elif kind == "embed":
            if self.st.asleep:
                self.waiting_embeds.append(msg)
            else:
                self._embed(msg)
        elif kind == "abort":
            self.running.pop(msg["id"], None)
        elif kind == "call":
            self._call(msg)
            if not self.st.asleep:
                for m in self.waiting_embeds:
                    self._embed(m)
                self.waiting_embeds.clear()
        elif kind == "shutdown":
            self.stopping = True

    def _step(self) -> None:
        """Emit one token for every running request (continuous batching)."""
        outputs = []
        crash = False
        for req in list(self.running.values()):
            if req.tokens is None:
                req.tokens = model.generate(self.st.digest, req.prompt, req.max_tokens)
            text = req.tokens[req.sent]
            req.sent += 1
            done = req.sent >= len(req.tokens)
            outputs.append({"id": req.id, "text": text, "index": req.sent - 1, "finished": done,
                            "finish_reason": "length" if done else None})
            if done:
                del self.running[req.id]
            self.tokens_total += 1
            limit = self.cfg.crash_after_tokens
            if limit is not None and self.tokens_total >= limit:
                crash = True
                break
        if outputs:
            self._send({"type": "outputs", "outputs": outputs})
        if crash:
            log.critical("Simulated engine crash after %d tokens (--sim-crash-after-tokens)",
                         self.tokens_total)
            time.sleep(0.05)
            os._exit(1)

    def _poll_timeout(self) -> float:
        active = bool(self.running) and not self.st.asleep
        return max(0.0, self.next_step - time.monotonic()) if active else 0.1

    def _idle(self) -> None:
        if self.running and not self.st.asleep and time.monotonic() >= self.next_step:
            self._step()
            self.next_step = time.monotonic() + self.cfg.token_delay

    def run(self) -> None:
        self.next_step = 0.0
        super().run()


def run_engine(cfg: EngineConfig) -> None:
    """Entry point of the spawned engine-core process."""
    run_engine_core(Engine, cfg)
