"""A vLLM server process (or anything speaking its HTTP protocol): spawn, health, sleep, wake."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Callable

import aiohttp

from .. import modellog, redact
from ..config import Config, WeightsEviction
from ..isolation.cgroups import Cgroup
from ..isolation.tree import ProcessTree
from ..logfollow import Source
from . import scratch

log = logging.getLogger(__name__)


#: How many lines of a tree's output a failure shows.
TAIL_LINES = 20

#: A fixed greedy request: its answer before a checkpoint must equal its answer after a restore.
CANARY = {"prompt": "llmuxd canary: the capital of France is", "max_tokens": 8, "temperature": 0}


class BackendError(Exception):
    """A call to the backend failed; the message says which and why."""


def served_name(name: str, extra_args: list[str]) -> str:
    """The name the backend knows the model by: llmuxd's name unless extra_args set one."""
    for i, arg in enumerate(extra_args):
        if arg == "--served-model-name" and i + 1 < len(extra_args):
            return extra_args[i + 1]
        if arg.startswith("--served-model-name="):
            return arg.split("=", 1)[1]
    return name


def pick_first_pid(index: int, taken: set[int] | frozenset[int] = frozenset()) -> int:
    """The first PID of the tree of the model at ``index`` in the config: distinct per model (see
    pidinit.py): 1000, 2000, ... in config order; when that one is ``taken`` (a model a reload
    added), the first one that is not."""
    slots = [1000 * (1 + i) for i in range(30)]
    wanted = slots[index % len(slots)]
    return wanted if wanted not in taken else next((s for s in slots if s not in taken), wanted)


class VllmBackend:
    """One model's server.  ``on_exit`` is called when the process tree's root exits without
    llmuxd having asked it to."""

    HEALTH_POLL_SECS = 0.1

    def __init__(self, name: str, config: Config, on_exit: Callable[[int], None], cgroup: Cgroup | None = None,
                 first_pid: int | None = None):
        self.name = name
        self.cfg = config.models[name]
        self.config = config
        self.eviction = config.eviction_for(name)
        self.served_name = served_name(name, self.cfg.extra_args)
        self.url = f"http://{_connect_host(self.bind_host)}:{self.cfg.port}"
        self.log_path = modellog.path_for(config.log_dir, name)
        iso = config.isolation
        if first_pid is None:
            first_pid = pick_first_pid(list(config.models).index(name))
        self.tree = ProcessTree(name, self.log_path, cgroup, pid_namespace=iso.pid_namespace,
                                block_io_uring=iso.block_io_uring, first_pid=first_pid)
        self.tmpdir = scratch.folder(self.cfg.port) if iso.own_tmpdir else None
        self._on_exit = on_exit
        self._expect_exit = False
        self._monitor: asyncio.Task | None = None
        self._session: aiohttp.ClientSession | None = None

    # -- process -------------------------------------------------------------------------
    @property
    def bind_host(self) -> str:
        """Where the backend listens: ``backend_host`` (loopback by default), unless the
        model's ``extra_args`` name a ``--host`` themselves."""
        args = list(self.cfg.extra_args)
        for i, a in enumerate(args):
            if a == "--host" and i + 1 < len(args):
                return args[i + 1]
            if a.startswith("--host="):
                return a.split("=", 1)[1]
        return self.config.backend_host

    def argv(self) -> list[str]:
        argv = [*self.config.vllm_command.split(), "serve", self.cfg.model_path, "--port", str(self.cfg.port)]
        if not any(a == "--host" or a.startswith("--host=") for a in self.cfg.extra_args):
            argv += ["--host", self.config.backend_host]
        if self.served_name == self.name:
            argv += ["--served-model-name", self.name]
        wants_sleep = self.eviction.weights is not WeightsEviction.RETAIN
        if self.cfg.enable_sleep_mode if self.cfg.enable_sleep_mode is not None else wants_sleep:
            argv.append("--enable-sleep-mode")
        return argv + _without_api_key(self.cfg.extra_args)[0]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        api_key = _without_api_key(self.cfg.extra_args)[1]
        if api_key is not None:  # in the environment, not on a command line everyone can read
            env["VLLM_API_KEY"] = api_key
        env["VLLM_SERVER_DEV_MODE"] = "1"  # /sleep, /wake_up, /collective_rpc, /reset_prefix_cache
        # Its output reaches the file (and llmuxd's log) as it is written, not when a buffer fills
        # or never (a killed process loses its buffers).
        env.setdefault("PYTHONUNBUFFERED", "1")
        if self.tmpdir is not None:
            env["TMPDIR"] = str(self.tmpdir)
        env.pop("NOTIFY_SOCKET", None)  # the daemon's, not the backend's
        env.pop("WATCHDOG_USEC", None)
        env.pop("WATCHDOG_PID", None)
        return env

    def secrets(self) -> tuple[str, ...]:
        """The secret values the tree is given (its secret options, its secret-looking
        environment): kept out of every line of its output that llmuxd shows."""
        argv, shown = self.argv(), redact.argv(self.argv())
        found = {a.split("=", 1)[1] if "=" in a and s.endswith(redact.REDACTED) and s != redact.REDACTED else a
                 for a, s in zip(argv, shown) if a != s}
        env = self.env()
        found |= {env[k] for k, v in redact.environ(env).items() if v != env[k]}
        return tuple(sorted(v for v in found if v))

    # -- its output ------------------------------------------------------------------------------
    def mark(self, what: str, *, create: bool = True) -> None:
        """A marker line in the tree's output file: what llmuxd does to it from here on (when the
        file cannot be written, the tree's own start or restore says so)."""
        try:
            modellog.mark(self.log_path, what, create=create)
        except OSError as e:
            log.warning("%s: cannot write to %s: %s", self.name, self.log_path, e.strerror or e)

    def output_tail(self, lines: int = TAIL_LINES, *, this_run: bool = True) -> list[str]:
        """The last lines of the tree's output (since llmuxd last started, restored or woke it,
        with ``this_run``), safe to show: escaped, secrets redacted."""
        return modellog.tail(self.log_path, lines, this_run=this_run, secrets=self.secrets())

    def output_source(self) -> Source:
        """What the daemon follows to forward the tree's output."""
        return Source(self.name, self.log_path, self.secrets())

    @property
    def running(self) -> bool:
        return self.tree.running

    def pids(self) -> list[int]:
        return self.tree.pids()

    async def start(self) -> None:
        argv = self.argv()
        self.mark(f"starting {redact.command_line(argv)}")
        self._expect_exit = False
        env = self.env()
        if self.tmpdir is not None:
            if why := scratch.safe_prepare(self.tmpdir):
                log.warning("%s: own temporary folder not used: %s", self.name, why)
                del env["TMPDIR"]
            elif gone := scratch.empty(self.tmpdir):  # left by a tree an earlier llmuxd lost
                log.info("%s: emptied its temporary folder of %d leftover(s)", self.name, len(gone))
        pid = await self.tree.spawn(argv, env)
        log.info("%s: spawned pid %d: %s (log %s)", self.name, pid, redact.command_line(argv), self.log_path)
        self._watch_exit()

    def adopt(self, root_pid: int) -> None:
        """Take over a running tree (left by an earlier llmuxd, or restored by CRIU)."""
        self._expect_exit = False
        self.tree.adopt(root_pid)
        self._watch_exit()

    def watch_restored(self) -> None:
        """The tree was brought back by CRIU (and is tracked): watch it like a started one."""
        self._expect_exit = False
        self._watch_exit()

    def _watch_exit(self) -> None:
        self._monitor = asyncio.create_task(self._watch(), name=f"watch-{self.name}")

    async def _watch(self) -> None:
        code = await self.tree.wait()
        if not self._expect_exit:
            self._on_exit(code)
            await self.tree.kill(grace_secs=0)  # what the dead root left running goes with it
            await self._tree_gone()

    async def _tree_gone(self) -> None:
        """After ``tree.kill`` (which released its /dev/shm files and sockets): its temporary folder."""
        if self.tmpdir is not None and not self.tree.pids():
            if gone := await asyncio.to_thread(scratch.empty, self.tmpdir):
                log.info("%s: removed %d file(s) the ended tree left in %s", self.name, len(gone), self.tmpdir)

    async def wait_ready(self, timeout: float) -> None:
        """Poll /health until 200; fail at once if the process exits, or after ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if not self.running:
                code = self.tree.returncode
                raise BackendError(f"backend exited with code {code} during start-up")
            try:
                async with self._http().get(self.url + "/health", timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        await asyncio.to_thread(self.tree.note_files)
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            if loop.time() >= deadline:
                raise BackendError(f"backend did not become healthy within {timeout:g} s")
            await asyncio.sleep(self.HEALTH_POLL_SECS)

    def expect_exit(self) -> None:
        """The tree is about to end by our doing (a stop, a CRIU dump): not a crash."""
        self._expect_exit = True

    def unexpect_exit(self) -> None:
        self._expect_exit = False

    async def stop(self, grace_secs: float = 10.0) -> None:
        self._expect_exit = True
        await self.tree.kill(grace_secs)
        await self._tree_gone()
        if self._monitor:
            await asyncio.gather(self._monitor, return_exceptions=True)
            self._monitor = None

    async def close(self) -> None:
        if self.tmpdir is not None and not self.tree.pids():  # at the daemon's end: an empty folder goes
            try:
                os.rmdir(self.tmpdir)
            except OSError:
                pass
        if self._session:
            await self._session.close()
            self._session = None

    # -- vLLM dev-mode endpoints --------------------------------------------------------------
    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        return self._session

    async def _post(self, path: str, json: dict | None = None) -> object:
        timeout = aiohttp.ClientTimeout(total=self.config.startup_timeout_for(self.name))
        try:
            async with self._http().post(self.url + path, json=json, timeout=timeout) as r:
                body = await r.text()
                if r.status != 200:
                    raise BackendError(f"POST {path} answered {r.status}: {body[:300]}")
                return body
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise BackendError(f"POST {path} failed: {e!r}") from None

    async def sleep(self, level: int) -> None:
        await self._post(f"/sleep?level={level}")

    async def wake_up(self) -> None:
        await self._post("/wake_up")

    async def reload_weights(self) -> None:
        await self._post("/collective_rpc", {"method": "reload_weights"})

    async def reset_prefix_cache(self) -> None:
        await self._post("/reset_prefix_cache")

    async def canary(self) -> str | None:
        """The answer to the fixed greedy canary request; None when the model does not do text
        completions (then there is nothing to compare)."""
        timeout = aiohttp.ClientTimeout(total=self.config.startup_timeout_for(self.name))
        try:
            async with self._http().post(self.url + "/v1/completions", timeout=timeout,
                                         json={"model": self.served_name, **CANARY}) as r:
                if r.status != 200:
                    return None
                return (await r.json())["choices"][0]["text"]
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, IndexError) as e:
            raise BackendError(f"canary request failed: {e!r}") from None

    async def probe(self) -> dict | None:
        """What answers on the model's port: ``{"served": [names], "sleeping": bool}``, or None."""
        timeout = aiohttp.ClientTimeout(total=5)
        try:
            async with self._http().get(self.url + "/health", timeout=timeout) as r:
                if r.status != 200:
                    return None
            async with self._http().get(self.url + "/v1/models", timeout=timeout) as r:
                served = [m.get("id") for m in (await r.json()).get("data", [])]
            async with self._http().get(self.url + "/is_sleeping", timeout=timeout) as r:
                sleeping = bool((await r.json()).get("is_sleeping")) if r.status == 200 else False
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, AttributeError):
            return None
        return {"served": served, "sleeping": sleeping}


def _connect_host(bind: str) -> str:
    """The address llmuxd connects to for a backend bound at ``bind``."""
    if bind in ("", "0.0.0.0"):
        return "127.0.0.1"
    if bind == "::":
        return "[::1]"
    return f"[{bind}]" if ":" in bind else bind


def _without_api_key(args: list[str]) -> tuple[list[str], str | None]:
    """``extra_args`` without ``--api-key KEY`` / ``--api-key=KEY``, and the key: vLLM reads it
    from ``VLLM_API_KEY`` just as well, and a command line is readable by every local user."""
    out, key, i = [], None, 0
    while i < len(args):
        if args[i] == "--api-key" and i + 1 < len(args):
            key, i = args[i + 1], i + 2
            continue
        if args[i].startswith("--api-key="):
            key = args[i].split("=", 1)[1]
        else:
            out.append(args[i])
        i += 1
    return out, key
