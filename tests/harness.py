"""Test harness: real llmuxd daemons on real ports, with real simulator backends."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent / "infra"))
from container import terminate  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
LLMUXD = str(VENV_BIN / "llmuxd")
SIM = str(VENV_BIN / "llmuxd-vllm-sim")


#: Every port handed out in this run (the session-end leak check ties llmuxd-<port> cgroups to it).
ISSUED_PORTS: set[int] = set()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ISSUED_PORTS.add(port)
    return port


def free_ports(n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def remove_cgroups(port: int) -> None:
    """Remove what is left (empty) of the llmuxd-<port> cgroup layout a test daemon made without
    systemd: a daemon killed by a test cannot clean it up itself."""
    from llmuxd.isolation.cgroups import cgroup2_mount, own_cgroup

    mount = cgroup2_mount()
    if mount is None:
        return
    base = mount / (own_cgroup() or "/").lstrip("/") / f"llmuxd-{port}"
    if not base.is_dir():
        return
    for d in sorted((p for p in base.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [base]:
        for _ in range(50):  # a killed tree may take a moment to leave its cgroup
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.05)


def remove_unheld(files: dict) -> None:
    """Remove what the backends' trees left on disk (``shm_files`` of theirs) that no process holds."""
    from llmuxd.isolation.procfs import release_files

    release_files(files)


class LlmuxdProcess:
    """``llmuxd serve`` as a child process with its own config and environment."""

    def __init__(self, workdir: Path, config: dict, env: dict[str, str]):
        self.workdir = workdir
        self.config = config
        self.env = env
        self.port = config["port"]
        ISSUED_PORTS.add(self.port)
        self.url = f"http://127.0.0.1:{self.port}"
        # The control API's address: the admin port when there is one.
        self.control_url = f"http://127.0.0.1:{config['admin_port']}" if config.get("admin_port") else self.url
        self.config_path = workdir / "config.json"
        self.log_path = workdir / "llmuxd.log"
        self.proc: subprocess.Popen | None = None
        self.backend_pids: set[int] = set()  # every backend pid ever seen, checked at stop
        self._started: dict[int, int] = {}  # backend pid -> its start time: a PID is reused once freed
        self.leftovers: list[int] = []  # backend pids still alive after llmuxd stopped
        self.shm_seen: dict = {}  # what its backends held that can outlive them (procfs.shm_files)
        self.argv_prefix: list[str] = []  # e.g. unshare ... to run llmuxd in other namespaces
        self.serve_args: list[str] = []  # more options for `llmuxd serve` (e.g. --dbus ADDRESS)

    def start(self, timeout: float = 20) -> "LlmuxdProcess":
        self.config_path.write_text(json.dumps(self.config, indent=2))
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*self.argv_prefix, LLMUXD, "serve", "--config", str(self.config_path), *self.serve_args],
            stdin=subprocess.DEVNULL,
            stdout=log, stderr=log, env=self.env, start_new_session=True,
        )
        log.close()

        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"llmuxd exited with {self.proc.returncode}:\n{self.log()}")
            try:
                return httpx.get(self.url + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, timeout, what="llmuxd /health")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def status(self) -> dict:
        from llmuxd.isolation.procfs import shm_files, stat as procfs_stat

        st = httpx.get(self.control_url + "/control/status", timeout=10).json()
        for m in st["models"].values():
            self.backend_pids.update(m["pids"])
            self.shm_seen.update(shm_files(m["pids"]))
            for pid in m["pids"]:
                if (ps := procfs_stat(pid)) is not None:
                    self._started[pid] = ps.starttime
        return st

    def control(self, verb: str, model: str, timeout: float = 60) -> httpx.Response:
        r = httpx.post(f"{self.control_url}/control/{verb}", json={"model": model}, timeout=timeout)
        self.status()
        return r

    def _same_backend(self, pid: int) -> bool:
        """``pid`` still names the live backend process seen in a status (not a later process that
        was given the freed PID: never kill a stranger)."""
        from llmuxd.isolation.procfs import stat as procfs_stat

        st = procfs_stat(pid)
        return st is not None and not st.zombie and st.starttime == self._started.get(pid)

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                self.status()
            except httpx.HTTPError:
                pass
            terminate(self.proc, timeout)
        self.leftovers = [p for p in sorted(self.backend_pids) if self._same_backend(p)]
        for pid in self.leftovers:  # never leave a backend behind, even when a test failed
            if self._same_backend(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        remove_cgroups(self.port)
        remove_unheld(self.shm_seen)  # segments of backends a test killed with SIGKILL, say
        return self.proc.returncode


async def greedy_completion(api, model: str, prompt: str, max_tokens: int, stream: bool) -> str:
    """One greedy completion through the official client, streamed or not: its text."""
    if stream:
        chunks = await api.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, stream=True,
                                              temperature=0)
        return "".join([c.choices[0].text async for c in chunks])
    return (await api.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                         temperature=0)).choices[0].text


def run_clients(url: str, clients: int, client) -> list[BaseException]:
    """``client(i, api)`` for ``clients`` concurrent official-openai clients sharing one
    AsyncOpenAI; returns what they raised."""
    import asyncio

    import openai

    errors: list[BaseException] = []

    async def run() -> None:
        api = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        out = await asyncio.gather(*(client(i, api) for i in range(clients)), return_exceptions=True)
        errors.extend(e for e in out if isinstance(e, BaseException))
        await api.close()

    asyncio.run(run())
    return errors


def alternating_load(url: str, clients: int, rounds: int, max_tokens: int) -> tuple[list, list]:
    """``clients`` concurrent official-openai clients, each alternating between m1 and m2 for
    ``rounds`` requests, odd clients streaming, greedy.  Returns ([(model, prompt, text)], [errors])."""
    results: list[tuple[str, str, str]] = []

    async def one_client(i: int, api) -> None:
        for r in range(rounds):
            model = ("m1", "m2")[(i + r) % 2]
            prompt = f"client {i} round {r}"
            results.append((model, prompt, await greedy_completion(api, model, prompt, max_tokens, bool(i % 2))))

    return results, run_clients(url, clients, one_client)


def dechunk(body: bytes) -> bytes:
    """The data of a chunked HTTP/1.1 body (as far as it goes)."""
    out = b""
    while body:
        size, _, body = body.partition(b"\r\n")
        n = int(size.split(b";")[0] or b"0", 16)
        if n == 0:
            break
        out, body = out + body[:n], body[n + 2:]
    return out


class RawResponse:
    """A response read off a raw socket: ``status`` (0: the connection closed with no answer)."""

    def __init__(self, data: bytes):
        self.raw = data
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1]) if lines[0].startswith("HTTP/") else 0
        self.headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            self.headers[k.strip().lower()] = v.strip()
        if self.headers.get("transfer-encoding") == "chunked":
            body = dechunk(body)
        self.body = body

    def json(self):
        return json.loads(self.body)


def raw_http(port: int, request: bytes, timeout: float = 10, host: str = "127.0.0.1") -> RawResponse:
    """Send ``request`` byte for byte (no client-side normalization), read until the server
    closes the connection (send ``Connection: close``) or ``timeout``."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(request)
        chunks = []
        try:
            while data := s.recv(65536):
                chunks.append(data)
        except (socket.timeout, ConnectionResetError):
            pass
    return RawResponse(b"".join(chunks))
