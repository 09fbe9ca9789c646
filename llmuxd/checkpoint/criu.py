"""Running CRIU: dump a model tree, restore it, with the options a vLLM tree needs.

Options, and why:
  --tcp-established   vLLM holds loopback TCP connections (gloo, its API listener's peers)
  --ext-unix-sk       unix sockets to peers outside the tree (never left open by llmuxd's
                      spawning, but harmless datagram ones may exist)
  --link-remap        open files deleted but still linked elsewhere (CRIU makes link_remap.N)
  --ghost-limit 256M  deleted-but-open files are kept in the images up to this size
  --file-locks        flock/posix locks held by the tree
  --network-lock      iptables when present, else nftables, else skip (loopback-only trees)
  --freeze-cgroup     the model's cgroup: a consistent snapshot of every process at once
  --manage-cgroups=ignore  (restore) the restored tree stays in the cgroup criu runs in, the
                      model's: by default CRIU puts it back into the cgroups recorded at the
                      dump (re-creating them), which are another layout's when the checkpoint
                      was made by a daemon on another port or in another container
  --leave-stopped     the dumped tree stays stopped (llmuxd kills it once the manifest is
                      written): killing it would end its PID namespace — and the criu running
                      inside it — before criu is done, and the files the manifest saves are
                      read while nothing can change them; (restore, on AMX hosts) the restored
                      tree waits until llmuxd gave its processes their AMX right back
                      (isolation/xstate.py)
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

from ..isolation import reaper
from ..isolation.procfs import all_stats
from ..isolation.cgroups import Cgroup

log = logging.getLogger(__name__)

COMMON = ["--tcp-established", "--ext-unix-sk", "--file-locks"]
RESTORE = ["--manage-cgroups=ignore"]


class CriuError(Exception):
    """CRIU failed; ``message`` carries its first error lines."""

    def __init__(self, action: str, message: str, log_path: Path | None = None):
        self.action = action
        self.log_path = log_path
        super().__init__(f"criu {action} failed: {message}" + (f" (log: {log_path})" if log_path else ""))


class CriuTimeout(CriuError):
    """CRIU did not finish in time and was killed."""


def _kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid`` (its leader included)."""
    for pid in [sid, *(st.pid for st in all_stats() if st.session == sid and st.pid != sid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def error_lines(log_path: Path, limit: int = 4) -> str:
    """The first CRIU 'Error' lines of a log, minus the harmless RLIMIT_NOFILE one."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return "no log"
    errs = [re.sub(r"^\(\s*[\d.]+\)\s*", "", ln) for ln in lines if "Error" in ln and "RLIMIT_NOFILE" not in ln]
    return "; ".join(errs[:limit]) or (lines[-1] if lines else "empty log")


def kernel_has_nf_tables() -> bool | None:
    """Whether the kernel has nf_tables (CRIU's nftables lock needs it; `criu check --feature
    nftables` only says CRIU was built with libnftables).  None: cannot tell."""
    if os.path.isdir("/sys/module/nf_tables"):
        return True
    try:
        import gzip

        with gzip.open("/proc/config.gz", "rt") as f:
            for line in f:
                if line.startswith("CONFIG_NF_TABLES="):
                    return line.strip().split("=", 1)[1] in ("y", "m")
        return False
    except OSError:
        return None


def criu_has_nftables(criu: str) -> bool:
    """Whether this CRIU was built with nftables (4.x calls the feature ``nftables``, 3.x
    ``network-lock-nftables``)."""
    for feature in ("nftables", "network-lock-nftables"):
        try:
            r = subprocess.run([criu, "check", "--feature", feature], capture_output=True, text=True, timeout=30,
                               stdin=subprocess.DEVNULL)
        except (OSError, subprocess.SubprocessError):
            return False
        if "Unknown feature" not in r.stdout + r.stderr:
            return r.returncode == 0
    return False


def network_lock_method(criu: str) -> tuple[str, str]:
    """Which ``--network-lock`` a dump uses here, and why — the one decision, for the daemon
    and ``llmuxd doctor`` alike: CRIU's default ``iptables`` when iptables-restore exists (CRIU
    runs it), else ``nftables`` when CRIU has it and the kernel may, else ``skip`` (a model tree
    talks over loopback only, and every peer of it is frozen with it)."""
    if tool := shutil.which("iptables-restore"):
        return "iptables", f"iptables-restore at {tool}: CRIU's default iptables lock"
    if criu_has_nftables(criu):
        kernel = kernel_has_nf_tables()
        if kernel is not False:
            return "nftables", "no iptables; CRIU has nftables" + ("" if kernel else " (kernel nf_tables support not verified)")
        return "skip", "no iptables; CRIU has nftables but the kernel has no nf_tables: TCP connections unlocked while dumping"
    return "skip", "no iptables and no nftables in CRIU: TCP connections unlocked while dumping"


class Criu:
    def __init__(self, path: str):
        self.path = path
        self._network_lock: str | None = None

    def available(self) -> bool:
        return bool(shutil.which(self.path) or os.access(self.path, os.X_OK))

    async def _run(self, args: list[str], *, cgroup: Cgroup | None = None, timeout: float | None = None,
                   enter: int | None = None) -> tuple[int, str]:
        """Run CRIU in a session of its own; past ``timeout`` every process of that session
        (CRIU, nsenter, whatever they started) is killed and CriuTimeout raised."""
        preexec = None
        if cgroup is not None:
            cgroup.create()
            procs = str(cgroup.path / "cgroup.procs")

            def preexec() -> None:  # the restored tree is criu's: it must be born in the model's cgroup
                with open(procs, "w") as f:
                    f.write("0")

        try:
            prefix = ["nsenter", "-t", str(enter), "-p", "-m", "--"] if enter else []
            proc = await asyncio.create_subprocess_exec(
                *prefix, self.path, *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, close_fds=True, preexec_fn=preexec, start_new_session=True,
            )
        except (OSError, subprocess.SubprocessError) as e:
            raise CriuError(args[0], f"cannot run {self.path}: {e}") from None
        reaper.track(proc.pid)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except (asyncio.TimeoutError, asyncio.CancelledError) as e:
            _kill_session(proc.pid)
            await proc.wait()
            if isinstance(e, asyncio.TimeoutError):
                raise CriuTimeout(args[0], f"no answer after {timeout:g} s: killed") from None
            raise
        finally:
            if proc.returncode is not None:
                reaper.untrack(proc.pid)
        return proc.returncode, out.decode(errors="replace")

    async def network_lock(self) -> str:
        """The ``--network-lock`` method, chosen once (see :func:`network_lock_method`)."""
        if self._network_lock is None:
            self._network_lock, why = await asyncio.to_thread(network_lock_method, self.path)
            log.info("criu: network lock %s (%s)", self._network_lock, why)
        return self._network_lock

    async def dump(self, pid: int, images: Path, *, freeze_cgroup: Path | None = None, enter: int | None = None,
                   timeout: float | None = None) -> None:
        """Dump the tree rooted at ``pid``; with ``enter``, CRIU runs inside the PID and mount
        namespaces of that process (``pid`` is then the PID in there)."""
        args = ["dump", "-t", str(pid), "-D", str(images), "-o", "dump.log", "-v4", *COMMON, "--leave-stopped",
                "--link-remap", "--ghost-limit", "256M", "--network-lock", await self.network_lock()]
        if freeze_cgroup is not None:
            args += ["--freeze-cgroup", str(freeze_cgroup)]
        code, out = await self._run(args, enter=enter, timeout=timeout)
        if code != 0:
            raise CriuError("dump", error_lines(images / "dump.log") if (images / "dump.log").exists() else out[-500:],
                            images / "dump.log")

    async def restore_argv(self, images: Path, work: Path, leave_stopped: bool = False) -> list[str]:
        """`criu restore` as run by a tree's init in fresh namespaces (pidinit --restore).
        ``leave_stopped``: the restored tree stays stopped until llmuxd continues it."""
        return [self.path, "restore", "-D", str(images), "-W", str(work), "-o", str(work / "restore.log"), "-v4",
                *COMMON, *RESTORE, "--restore-detached", "--pidfile", str(work / "restore.pid"),
                "--network-lock", await self.network_lock(), *(["--leave-stopped"] if leave_stopped else [])]

    async def restore(self, images: Path, work: Path, cgroup: Cgroup | None, timeout: float | None = None,
                      leave_stopped: bool = False) -> int:
        """Restore detached; returns the restored root's PID (a child of ours when we are a
        child subreaper)."""
        work.mkdir(parents=True, exist_ok=True)
        pidfile = work / "restore.pid"
        pidfile.unlink(missing_ok=True)
        args = ["restore", "-D", str(images), "-W", str(work), "-o", str(work / "restore.log"), "-v4",
                *COMMON, *RESTORE, "--restore-detached", "--pidfile", str(pidfile),
                "--network-lock", await self.network_lock(), *(["--leave-stopped"] if leave_stopped else [])]
        code, out = await self._run(args, cgroup=cgroup, timeout=timeout)
        if code != 0:
            raise CriuError("restore", error_lines(work / "restore.log"), work / "restore.log")
        return int(pidfile.read_text().strip())

    async def version(self) -> str:
        code, out = await self._run(["--version"])
        m = re.search(r"Version:\s*(\S+)", out)
        return m.group(1) if m else out.strip()
