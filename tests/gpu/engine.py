"""The GPU test backend's engine core: a spawned child of the API server (like vLLM's EngineCore),
holding real GPU state.  The process's plumbing is the simulator's (llmuxd.sim.core.EngineCore:
the ZMQ protocol of llmuxd.sim.protocol, status block, heartbeat, receive loop, shutdown).

On start: CUDA context, weights read from the HF-cache safetensors file, KV buffer, one decode
step captured as a CUDA graph (eager on CPU or with --enforce-eager).  Utility calls:

* ``sleep`` level 1: weights copied to host RAM, then weights, KV buffer and graph freed
  (``del`` + ``torch.cuda.empty_cache()``); level 2: the same without the host copy;
* ``wake_up`` (tags ``weights``, ``kv_cache``): memory allocated again (level 2: weights
  uninitialised, as vLLM's), graph captured again once both are back;
* ``reload_weights``: the safetensors file read again into the weights, in place;
* ``reset_prefix_cache``: KV buffer zeroed;  ``is_sleeping``;  ``gpu_info`` (for tests/benchmarks).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from llmuxd.sim import protocol
from llmuxd.sim.core import EngineCore, EngineCoreConfig, run_engine_core
from llmuxd.sim.engine import ALL_TAGS

log = logging.getLogger("gpu.engine")


@dataclass
class GpuEngineConfig(EngineCoreConfig):
    enforce_eager: bool = False
    device: str | None = None  # None: cuda when available, else cpu


class Engine(EngineCore):
    log = log

    def __init__(self, cfg: GpuEngineConfig) -> None:
        import torch

        from gpu import model as m

        super().__init__(cfg)
        self.torch, self.m = torch, m
        self.weights_file = sorted(self.path.glob("*.safetensors"))[0]
        self.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cuda = self.device.type == "cuda"
        self.dims = m.Dims.from_config(json.loads((self.path / "config.json").read_text()))
        self.lm = m.TinyLM(self.dims, self.device)
        self.asleep: set[str] = set()
        self.host_copy: dict[str, Any] | None = None
        self.graph = None
        self.static: dict[str, Any] = {}
        self.timings: dict[str, float] = {}
        self.memory: dict[str, dict[str, int]] = {}  # GPU memory after each step

    def _usage(self) -> tuple[int, int]:
        return self._allocated(), 0

    # -- memory ----------------------------------------------------------------------------------
    def _allocated(self) -> int:
        return self.lm.weights_bytes() + self.lm.kv_bytes()

    def _mem(self, label: str) -> None:
        t = self.torch
        rec = {"weights": self.lm.weights_bytes(), "kv": self.lm.kv_bytes()}
        if self.cuda:
            free, total = t.cuda.mem_get_info()
            rec |= {"allocated": t.cuda.memory_allocated(), "reserved": t.cuda.memory_reserved(),
                    "device_free": free, "device_total": total}
        self.memory[label] = rec

    def _free_gpu(self) -> None:
        self.graph = None
        self.static = {}
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.empty_cache()
            clear = getattr(self.torch._C, "_cuda_clearCublasWorkspaces", None)
            if clear is not None:
                clear()
            self.torch.cuda.empty_cache()

    def _capture(self) -> None:
        """One decode step as a CUDA graph over static tok/pos/out tensors."""
        t = self.torch
        tok = t.zeros(1, dtype=t.int64, device=self.device)
        pos = t.zeros(1, dtype=t.int64, device=self.device)
        self.static = {"tok": tok, "pos": pos}
        if not self.cuda or self.cfg.enforce_eager:
            self.graph = None
            return
        t0 = time.monotonic()
        s = t.cuda.Stream()
        s.wait_stream(t.cuda.current_stream())
        with t.cuda.stream(s):
            for _ in range(2):  # warm-up (cuBLAS handles, workspaces) outside the capture
                self.lm.step(tok, pos)
        t.cuda.current_stream().wait_stream(s)
        g = t.cuda.CUDAGraph()
        with t.cuda.graph(g):
            self.static["out"] = self.lm.step(tok, pos)
        self.graph = g
        self.lm.kv.zero_()  # the warm-up wrote slot 0
        t.cuda.synchronize()
        self.timings["graph_capture"] = time.monotonic() - t0

    # -- life cycle ------------------------------------------------------------------------------
    def load(self) -> None:
        t0 = time.monotonic()
        log.info("Loading %s from %s on %s", self.cfg.model, self.weights_file, self.device)
        if self.cuda:
            self.torch.cuda.init()
            self.torch.zeros(1, device=self.device)  # the CUDA context
        self.timings["cuda_init"] = time.monotonic() - t0
        t1 = time.monotonic()
        self.lm.alloc_weights()
        n = self.m.load_into(self.weights_file, self.lm.weights)
        if self.cuda:
            self.torch.cuda.synchronize()
        self.timings["load_weights"] = time.monotonic() - t1
        self.lm.alloc_kv()
        self._capture()
        self.timings["startup"] = time.monotonic() - t0
        self._mem("loaded")
        log.info("Model loading took %.2f s: weights %d bytes (%d read), KV buffer %d bytes, graph %s",
                 self.timings["startup"], self.lm.weights_bytes(), n, self.lm.kv_bytes(), self.graph is not None)
        self.state = protocol.STATE_READY
        self._publish()
        self._send({"type": "ready", "pid": self.pid, "cache_file": None, "gpu_bytes": self._allocated()})

    def _sleep(self, level: int) -> None:
        if self.asleep:
            return
        t0 = time.monotonic()
        self._mem("before_sleep")
        self.host_copy = {k: v.to("cpu", copy=True) for k, v in self.lm.weights.items()} if level == 1 else None
        self.lm.weights = None
        self.lm.kv = None
        self._free_gpu()
        self.asleep = set(ALL_TAGS)
        self.state = protocol.STATE_SLEEPING
        self.timings[f"sleep_level{level}"] = time.monotonic() - t0
        self._mem("asleep")
        log.info("Sleep level %d took %.3f s: weights %s, KV buffer freed; GPU memory held %s",
                 level, self.timings[f"sleep_level{level}"], "offloaded" if level == 1 else "discarded",
                 self.memory["asleep"].get("reserved"))

    def _wake(self, tags: list[str] | None) -> None:
        wake = set(tags or ALL_TAGS) & self.asleep
        if not wake:
            return
        t0 = time.monotonic()
        if "weights" in wake:
            self.lm.alloc_weights()  # level 2: uninitialised until reload_weights
            if self.host_copy is not None:
                for k, v in self.host_copy.items():
                    self.lm.weights[k].copy_(v)
                self.host_copy = None
        if "kv_cache" in wake:
            self.lm.alloc_kv()
        self.asleep -= wake
        if not self.asleep:
            self._capture()
            self.state = protocol.STATE_READY
        self.timings["wake_up"] = time.monotonic() - t0
        self._mem("awake")
        log.info("Woke up %s in %.3f s", sorted(wake), self.timings["wake_up"])

    def _reload(self) -> None:
        if "weights" in self.asleep:
            raise ValueError("cannot reload weights while the weights are asleep")
        t0 = time.monotonic()
        n = self.m.load_into(self.weights_file, self.lm.weights)
        if self.cuda:
            self.torch.cuda.synchronize()
        self.timings["reload_weights"] = time.monotonic() - t0
        self._mem("reloaded")
        log.info("Reloaded %d bytes of weights from %s in %.3f s", n, self.weights_file, self.timings["reload_weights"])

    def info(self, checksum: bool = False) -> dict[str, Any]:
        self._mem("now")
        out: dict[str, Any] = {
            "pid": self.pid, "device": str(self.device), "graph": self.graph is not None,
            "asleep": sorted(self.asleep), "weights_bytes": self.lm.weights_bytes(), "kv_bytes": self.lm.kv_bytes(),
            "timings": {k: round(v, 4) for k, v in self.timings.items()}, "memory": self.memory}
        if self.cuda:
            out["device_name"] = self.torch.cuda.get_device_name(self.device)
        if checksum and not self.asleep:
            out["checksum"] = self.lm.checksum()
            if self.cuda:
                self.torch.cuda.empty_cache()  # the temporaries must not stay cached (a suspend copies them)
        return out

    # -- requests ----------------------------------------------------------------------------------
    def _next(self, tok: int, pos: int) -> int:
        st = self.static
        st["tok"].fill_(tok)
        st["pos"].fill_(pos)
        if self.graph is not None:
            self.graph.replay()
            return int(st["out"].item())
        return int(self.lm.step(st["tok"], st["pos"]).item())

    def _generate(self, msg: dict[str, Any]) -> None:
        if self.asleep:
            raise ValueError("the engine is asleep")
        max_tokens = int(msg["max_tokens"])
        ids = self.m.encode(msg["prompt"], self.dims.vocab)
        ids = ids[-max(1, self.dims.window - max_tokens):]  # keep the end of a long prompt
        nxt = 0
        for pos, tid in enumerate(ids):
            nxt = self._next(tid, pos)
        pos = len(ids)
        for i in range(max_tokens):
            done = i == max_tokens - 1
            self._send({"type": "outputs", "outputs": [{"id": msg["id"], "text": self.m.decode_token(nxt),
                                                        "index": i, "finished": done,
                                                        "finish_reason": "length" if done else None}]})
            self.tokens_total += 1
            if not done:
                nxt = self._next(nxt, pos)
                pos += 1

    def _call(self, msg: dict[str, Any]) -> None:
        method, args = msg.get("method"), msg.get("args") or {}
        try:
            result: Any = None
            if method == "sleep":
                self._sleep(int(args.get("level", 1)))
            elif method == "wake_up":
                self._wake(args.get("tags"))
            elif method == "is_sleeping":
                result = bool(self.asleep)
            elif method == "reload_weights":
                self._reload()
            elif method == "reset_prefix_cache":
                if self.lm.kv is not None:
                    self.lm.kv.zero_()
                result = True
            elif method == "gpu_info":
                result = self.info(bool(args.get("checksum")))
            else:
                raise ValueError(f"unknown method {method!r}")
        except ValueError as e:
            self._send({"type": "reply", "id": msg["id"], "ok": False, "error": str(e), "kind": protocol.ERR_BAD_REQUEST})
        except self.torch.OutOfMemoryError as e:
            log.error("torch.OutOfMemoryError: %s", e)
            self._send({"type": "reply", "id": msg["id"], "ok": False, "error": str(e), "kind": protocol.ERR_OOM})
        else:
            self._send({"type": "reply", "id": msg["id"], "ok": True, "result": result})
        self._publish()

    def _handle(self, msg: dict[str, Any]) -> None:
        kind = msg["type"]
        if kind == "generate":
            try:
                self._generate(msg)
            except ValueError as e:
                log.error("generate failed: %s", e)
                self._send({"type": "outputs", "outputs": [{"id": msg["id"], "text": "", "index": 0,
                                                            "finished": True, "finish_reason": "abort"}]})
        elif kind == "embed":
            vecs = [self.lm.embed_text(self.m.encode(t, self.dims.vocab)) for t in msg["inputs"]]
            self._send({"type": "embeddings", "id": msg["id"], "vectors": vecs,
                        "prompt_tokens": sum(len(self.m.encode(t, self.dims.vocab)) - 1 for t in msg["inputs"])})
        elif kind == "call":
            self._call(msg)
        elif kind == "shutdown":
            self.stopping = True
        # "abort": requests run to completion one at a time; nothing to drop


def run_engine(cfg: GpuEngineConfig) -> None:
    """Entry point of the spawned engine-core process."""
    run_engine_core(Engine, cfg)
