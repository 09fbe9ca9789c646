"""Simulated GPU memory: one byte budget shared by every simulator on the machine.

Each awake engine holds a lease file ``<dir>/lease-<token>.json`` with
``{"token", "pid", "pidns", "start_time", "beat", "bytes", "model"}``. Leases are taken under an
flock on ``<dir>/lock``; the lock fd is closed right after, so a live engine keeps no file in the
directory open (it may be CRIU-dumped). A lease counts only while its holder lives.  Engines run in
PID namespaces of their own (llmuxd puts each model tree in one, with its own /proc), where a
pid means nothing to a reader in another namespace; so the holder refreshes ``beat`` (a
timestamp) every few hundred milliseconds, and a lease whose beat is older than ``TTL`` is dead.
A reader in the holder's own PID namespace also drops it at once when the pid is gone or its
start time changed (pid reuse, or a CRIU restore).

Environment: ``LLMUXD_SIM_GPU_DIR`` (default ``/dev/shm/llmuxd-sim-gpu``) and
``LLMUXD_SIM_GPU_BYTES`` (default 1 GiB).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

DEFAULT_DIR = "/dev/shm/llmuxd-sim-gpu"
DEFAULT_BUDGET = 1 << 30
_PREFIX = "lease-"
TTL = 2.0  # seconds without a heartbeat after which a lease is dead
_token: str | None = None  # this process's lease


class OutOfMemory(Exception):
    """Raised when a lease would exceed the budget (the simulated CUDA OOM)."""

    foreign: dict[str, float] = {}  # counted leases of other PID namespaces: token -> last beat


def gpu_dir(dir: str | os.PathLike[str] | None = None) -> Path:
    """The lease directory (argument, else env, else default)."""
    return Path(dir or os.environ.get("LLMUXD_SIM_GPU_DIR") or DEFAULT_DIR)


def budget() -> int:
    """The total simulated GPU memory in bytes."""
    return int(os.environ.get("LLMUXD_SIM_GPU_BYTES") or DEFAULT_BUDGET)


def _start_time(pid: int | str) -> int | None:
    """Start time (clock ticks since boot) of a live, non-zombie process, else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _pidns() -> int:
    return os.stat("/proc/self/ns/pid").st_ino


def _alive(lease: dict[str, Any]) -> bool:
    if time.time() - float(lease.get("beat", 0)) > TTL:
        return False
    if lease.get("pidns") == _pidns():  # same namespace: the pid tells at once
        start = _start_time(lease["pid"])
        return start is not None and start == lease.get("start_time")
    return True


def _lease_path(d: Path, token: str) -> Path:
    return d / f"{_PREFIX}{token}.json"


def _read_leases(d: Path) -> list[tuple[Path, dict[str, Any]]]:
    out = []
    try:
        names = sorted(os.listdir(d))
    except FileNotFoundError:
        return []
    for name in names:
        if not (name.startswith(_PREFIX) and name.endswith(".json")):
            continue
        path = d / name
        try:
            lease = json.loads(path.read_text())
            int(lease["pid"]), int(lease["bytes"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        out.append((path, lease))
    return out


def usage(dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Live leases: ``{"budget", "used", "leases": [{"pid", "bytes", "model", "path"}]}``."""
    leases = [
        {"pid": lease["pid"], "bytes": lease["bytes"], "model": lease.get("model"), "path": str(p)}
        for p, lease in _read_leases(gpu_dir(dir)) if _alive(lease)
    ]
    return {"budget": budget(), "used": sum(x["bytes"] for x in leases), "leases": leases}


def _proc_pid() -> int:
    """This process's pid as /proc numbers it (informational: which process holds a lease)."""
    return int(os.readlink("/proc/self"))


def _write(d: Path, token: str, nbytes: int, model: str) -> Path:
    path = _lease_path(d, token)
    tmp = d / f".{path.name}.tmp"
    tmp.write_text(json.dumps({"token": token, "pid": _proc_pid(), "pidns": _pidns(), "start_time": _start_time("self"),
                               "beat": time.time(), "bytes": nbytes, "model": model}))
    os.replace(tmp, path)
    return path


def acquire(nbytes: int, model: str, dir: str | os.PathLike[str] | None = None) -> Path:
    """Take (or replace) this process's lease of ``nbytes``; raise OutOfMemory past the budget.

    A real GPU frees a dead process's memory at once; here a holder in another PID namespace is
    known dead only when its heartbeat is TTL old.  So when the budget is short, wait (at most
    TTL) until each such lease has either beaten again (its holder lives: out of memory) or
    expired (its memory is free again)."""
    deadline = time.time() + TTL + 0.2
    seen: dict[str, float] | None = None
    while True:
        try:
            return _acquire(nbytes, model, dir)
        except OutOfMemory as e:
            if not e.foreign or time.time() > deadline:
                raise
            seen = seen if seen is not None else e.foreign
            if all(e.foreign.get(t, b) > b for t, b in seen.items()):
                raise  # every holder beat again: alive
        time.sleep(0.1)


def _acquire(nbytes: int, model: str, dir: str | os.PathLike[str] | None) -> Path:
    global _token
    d = gpu_dir(dir)
    d.mkdir(parents=True, exist_ok=True)
    fd = os.open(d / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        used, foreign = 0, {}
        for path, lease in _read_leases(d):
            if lease.get("token") == _token:
                continue
            if not _alive(lease):
                path.unlink(missing_ok=True)
                continue
            used += int(lease["bytes"])
            if lease.get("pidns") != _pidns():
                foreign[str(lease.get("token"))] = float(lease.get("beat", 0))
        total = budget()
        if used + nbytes > total:
            e = OutOfMemory(
                f"CUDA out of memory. Tried to allocate {nbytes} bytes. GPU has a total capacity of "
                f"{total} bytes of which {max(total - used, 0)} bytes are free."
            )
            e.foreign = foreign
            raise e
        _token = _token or uuid.uuid4().hex
        return _write(d, _token, nbytes, model)
    finally:
        os.close(fd)


def heartbeat(dir: str | os.PathLike[str] | None = None) -> None:
    """Keep this process's lease alive (call more often than TTL)."""
    d = gpu_dir(dir)
    if _token is None:
        return
    try:
        lease = json.loads(_lease_path(d, _token).read_text())
    except (OSError, ValueError):
        return
    _write(d, _token, int(lease["bytes"]), lease.get("model", ""))


def release(dir: str | os.PathLike[str] | None = None) -> None:
    """Drop this process's lease, if any."""
    global _token
    if _token is not None:
        _lease_path(gpu_dir(dir), _token).unlink(missing_ok=True)
        _token = None


def self_start_time() -> int | None:
    """This process's start time; it changes when CRIU restores the process."""
    return _start_time("self")


def holds(dir: str | os.PathLike[str] | None = None) -> bool:
    """Whether this process has a valid lease (False after a CRIU restore changed its start time)."""
    if _token is None:
        return False
    try:
        lease = json.loads(_lease_path(gpu_dir(dir), _token).read_text())
    except (OSError, ValueError):
        return False
    return lease.get("start_time") == _start_time("self") and _alive(lease)
