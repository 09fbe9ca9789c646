"""The shell of an engine-core process, as vLLM's EngineCore has one: a spawned child of the API
server that talks to it over two ZMQ sockets and a shared-memory status block, beats while the
API server lives and ends with it.  The simulated engine (:mod:`.engine`) and the GPU test
backend's engine build on it."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any, Callable

import zmq

from llmuxd.sim import protocol
from llmuxd.sim.logs import setup_logging

log = logging.getLogger("llmuxd.sim.engine")


@dataclass
class EngineCoreConfig:
    """What every engine core needs: its model and where the API server listens (pickled to the
    spawned child)."""

    model: str  # the MODEL argument
    model_path: str  # resolved folder
    served_name: str
    input_address: str
    output_address: str
    shm_name: str


class EngineCore:
    """An engine-core process's side of the API server's protocol (llmuxd.sim.protocol): the two
    ZMQ sockets, the status block, the heartbeat thread (which also ends the process once the API
    server is gone), the receive loop and the shutdown.  The simulated engine below and the GPU
    test backend's (tests/gpu/engine.py) are this with their own model; a subclass provides
    ``load()`` (ends with the "ready" message), ``_handle(msg)`` and ``_usage()``."""

    log = log

    def __init__(self, cfg: EngineCoreConfig) -> None:
        self.cfg = cfg
        self.path = Path(cfg.model_path)
        self.pid = os.getpid()
        self.ppid = os.getppid()
        self.ctx = zmq.Context(io_threads=1)
        self.inp = self.ctx.socket(zmq.PULL)
        self.inp.connect(cfg.input_address)
        self.out = self.ctx.socket(zmq.PUSH)
        self.out.setsockopt(zmq.LINGER, 1000)
        self.out.connect(cfg.output_address)
        self.shm = shared_memory.SharedMemory(name=cfg.shm_name)
        self.state = protocol.STATE_LOADING
        self.heartbeat = 0
        self.tokens_total = 0
        self.stopping = False

    # -- what a subclass provides ------------------------------------------------------------
    def load(self) -> None:
        raise NotImplementedError

    def _handle(self, msg: dict[str, Any]) -> None:
        raise NotImplementedError

    def _usage(self) -> tuple[int, int]:
        """(GPU bytes held, requests running), for the status block."""
        raise NotImplementedError

    def _tick(self, n: int) -> None:
        """Called by the heartbeat thread every 0.1 s (``n``: the count so far)."""

    def _poll_timeout(self) -> float:
        """Seconds the receive loop waits for a message."""
        return 0.1

    def _idle(self) -> None:
        """Called by the receive loop after each wait for messages."""

    def _release(self) -> None:
        """Give back what must not outlive the process (called when it ends, however it ends)."""

    # -- status block and background checks ------------------------------------------------
    def _publish(self) -> None:
        gpu_bytes, requests = self._usage()
        protocol.write_status(self.shm.buf, state=self.state, engine_pid=self.pid,
                              heartbeat=self.heartbeat, tokens=self.tokens_total,
                              gpu_bytes=gpu_bytes, requests=requests)

    def _watch(self) -> None:
        """Heartbeat; exit if the API server is gone; then the subclass's periodic work."""
        n = 0
        while not self.stopping:
            time.sleep(0.1)
            n += 1
            self.heartbeat += 1
            try:
                self._publish()
            except (ValueError, TypeError):  # status block closed at shutdown
                return
            if os.getppid() != self.ppid:
                self.log.error("API server process is gone; engine core exiting")
                self._release()
                os._exit(1)
            self._tick(n)

    # -- messages ----------------------------------------------------------------------------
    def _send(self, msg: dict[str, Any]) -> None:
        self.out.send(protocol.encode(msg))

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.inp, zmq.POLLIN)
        while not self.stopping:
            if poller.poll(self._poll_timeout() * 1000):
                while True:
                    try:
                        data = self.inp.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._handle(protocol.decode(data))
            self._idle()
        self._release()
        self.log.info("Engine core shut down")

    def close(self) -> None:
        self.stopping = True
        self.inp.close(0)
        self.out.close()
        self.ctx.term()
        self.shm.close()


def run_engine_core(make: Callable[[Any], EngineCore], cfg: EngineCoreConfig) -> None:
    """The life of a spawned engine-core process: logging, signals (SIGINT ignored, SIGTERM
    stops the receive loop), the heartbeat thread, load, serve, close; ``make(cfg)`` builds the
    engine.  A failure is logged and ends the process with status 1."""
    setup_logging()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the API server decides when we stop
    engine = make(cfg)

    def on_term(signum: int, frame: Any) -> None:
        engine.stopping = True

    signal.signal(signal.SIGTERM, on_term)
    threading.Thread(target=engine._watch, name="engine-watch", daemon=True).start()
    try:
        engine.load()
        engine.run()
    except SystemExit:
        engine._release()
        raise
    except BaseException:
        engine.log.exception("Engine core failed")
        engine._release()
        sys.exit(1)
    engine.close()
