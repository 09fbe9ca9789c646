"""What the tests' containers have in common (stdlib and llmuxd's /proc reader).

* ``Container``: the life cycle every test container shares.  ``start()`` makes it and returns
  it; ``stop()`` ends everything in it and removes what ``start()`` made, and is safe to call more
  than once and after a ``start()`` that failed at any point; ``with c:`` starts it (unless it is
  started) and stops it at the end, a clean-up error not hiding one of the body; ``root`` and
  ``path()`` reach its files from the host through /proc/PID/root of a process inside; ``run()``
  runs a command inside and waits for it.  A container that tracks itself (``_track()`` in
  ``start()``, ``_untrack()`` in ``stop()``) is stopped at the latest when the interpreter exits.
  Subclasses: ``mntns.MountContainer``, ``nspawn.Container``, ``entrypoint.EntrypointContainer``
  and the GPU run's container (tests/gpu/drive.py).
* ``terminate(target, timeout)``: SIGTERM, up to ``timeout`` s for the process to end, then
  SIGKILL: the one stop helper of the tests, the benchmarks and the GPU run.
* ``starttime(pid)``, ``ContainerError``, ``NAME_RE``.
"""

from __future__ import annotations

import abc
import atexit
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Sequence

from llmuxd.isolation import procfs

__all__ = ["Container", "ContainerError", "NAME_RE", "starttime", "terminate"]

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class ContainerError(RuntimeError):
    """A container could not be started, driven or cleaned up."""


def starttime(pid: int | str) -> str | None:
    """`pid`'s start time (clock ticks after boot, /proc/PID/stat's field 22), or None if it is
    gone: with the PID it names one process for good (a PID is reused once freed)."""
    st = procfs.stat(pid)
    return None if st is None else str(st.starttime)


def terminate(target: subprocess.Popen | int, timeout: float, *, kill_wait: float | None = None,
              group: bool = False) -> bool:
    """Stop a process: SIGTERM, up to `timeout` s for it to end, then SIGKILL and up to `kill_wait`
    s more (None: as long as it takes).

    `target` is a Popen (reaped; with ``group=True`` its whole process group is signalled) or a
    PID, which is pinned with a pidfd first (a PID freed and reused meanwhile is never signalled;
    None for `kill_wait` is 10 s then) and reaped if it is a child of this process.  Returns True
    if it ended within `timeout` of the SIGTERM or had ended already, False if it had to be
    killed (whether it is gone now: ``Popen.poll()``, ``procfs.alive()``)."""
    if not isinstance(target, subprocess.Popen):
        return _terminate_pid(target, timeout, 10.0 if kill_wait is None else kill_wait)
    if target.poll() is not None:
        return True

    def send(sig: int) -> None:
        if group:
            os.killpg(target.pid, sig)
        else:
            target.send_signal(sig)

    send(signal.SIGTERM)
    try:
        target.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        pass
    send(signal.SIGKILL)
    try:
        target.wait(kill_wait)
    except subprocess.TimeoutExpired:
        pass
    return False


def _terminate_pid(pid: int, timeout: float, kill_wait: float) -> bool:
    start = starttime(pid)
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return True
    ended = True
    try:
        if starttime(pid) != start:
            return True
        signal.pidfd_send_signal(fd, signal.SIGTERM)
        end = time.monotonic() + timeout
        while procfs.alive(pid) and time.monotonic() < end:
            time.sleep(0.1)
        if procfs.alive(pid):
            ended = False
            signal.pidfd_send_signal(fd, signal.SIGKILL)
            end = time.monotonic() + kill_wait
            while procfs.alive(pid) and time.monotonic() < end:
                time.sleep(0.1)
    except OSError:
        pass
    finally:
        os.close(fd)
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    return ended


# Containers started and not yet stopped (strong references: a forgotten container is still
# stopped when the interpreter exits).
_live: "set[Container]" = set()


@atexit.register
def _stop_all() -> None:
    for c in list(_live):
        try:
            c._stop_at_exit()
        except Exception:
            pass


class Container(abc.ABC):
    """A test container (see the module's description); ``name``: letters, digits, - _ ., at
    most 63."""

    def __init__(self, name: str) -> None:
        if not NAME_RE.match(name):
            raise ValueError(f"bad container name {name!r} (letters, digits, - _ ., at most 63)")
        self.name = name

    # ---------------------------------------------------------------- what a subclass provides

    @abc.abstractmethod
    def start(self) -> "Container":
        """Make the container; returns it once it is usable."""

    @abc.abstractmethod
    def stop(self) -> None:
        """End everything in the container and remove what start() made."""

    @property
    @abc.abstractmethod
    def started(self) -> bool:
        """Whether start() was called and stop() not since."""

    @abc.abstractmethod
    def _root_pid(self) -> int:
        """A process inside whose root is the container's; ContainerError if there is none."""

    def run(self, cmd: str | Sequence[str], check: bool = True, timeout: float | None = 120.0, *,
            input: str | bytes | None = None, env: dict[str, str] | None = None, cwd: str | None = None,
            text: bool = True) -> subprocess.CompletedProcess:
        """Run `cmd` inside (a string by /bin/sh -c) and wait: its exit code and captured output;
        CalledProcessError with ``check`` if it failed."""
        raise NotImplementedError(f"{type(self).__name__} runs no commands inside")

    def _stop_at_exit(self) -> None:
        self.stop()

    # ---------------------------------------------------------------- shared

    @property
    def root(self) -> Path:
        """The container's root filesystem as seen from the host: /proc/PID/root."""
        return Path(f"/proc/{self._root_pid()}/root")

    def path(self, p: str | os.PathLike) -> Path:
        """Host path of the container's path `p` (through /proc/PID/root)."""
        return self.root / str(p).lstrip("/")

    def _track(self) -> None:
        _live.add(self)

    def _untrack(self) -> None:
        _live.discard(self)

    def __enter__(self):
        if not self.started:
            self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.stop()
        except ContainerError:
            if exc_type is None:
                raise
