"""PID 1 of a model tree's own PID and mount namespaces.

llmuxd starts every model tree as::

    unshare --pid --fork --mount --mount-proc python -m llmuxd.isolation.pidinit --stdio LOG -- CMD...

Why a PID namespace per tree: CRIU restores every process with the PID it had; in a namespace of
its own that PID cannot be taken by anyone else — in this container, or in a fresh one that
happens to have started other processes first.  Clashes are impossible by construction.

Why a mount namespace with its own /proc: a process must find itself as /proc/<os.getpid()>.
Real vLLM reads /proc/<pid>/status at start (CPU memory affinity) and uses psutil on its own
PIDs; with the parent's /proc those numbers name strangers (or nobody).  Nothing else differs
from the container: the namespace is a copy of its mounts, with /proc mounted for the tree.

CRIU works from inside (``nsenter -t INIT -p -m criu dump -t SERVER``, where SERVER is this
init's child): the tree's namespaces are then CRIU's own, so no mount or namespace state goes
into the images, and a restore is just as simple — ``--restore DIR`` mode: this init, in a fresh
pair of namespaces, runs ``criu restore --restore-detached`` as its child (with a high PID, so
the dumped PIDs are free), takes the restored server as its own child, and goes on as if it had
started it.

Trees share the container's network namespace, so names derived from a PID (abstract unix
sockets: the CUDA driver makes some) would collide between two trees whose servers both have
PID 2 in their namespaces: each model's server starts at its own ``--first-pid``.

As init it: reopens stdio by path inside the new mount namespace (inherited fds would point at
the outer one's mounts, which CRIU cannot dump), installs the io_uring seccomp filter (CRIU
cannot dump io_uring; the server and everything below inherit it), forks the server as a
session leader, forwards termination signals to it, reaps orphans, and exits with the server's
status (the kernel then kills whatever is left in the namespace).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
RESTORED = "restored"  # written into the restore work dir once the tree is back: the server's pid


def _reopen_stdio(log: str) -> None:
    null = os.open("/dev/null", os.O_RDONLY)
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(null)
    os.close(out)


def _high_pid() -> int:
    """Where criu itself runs in a restore: near pid_max, out of the dumped tree's way."""
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text()) - 500
    except (OSError, ValueError):
        return 32000


def _set_last_pid(pid: int) -> None:
    try:
        Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid))
    except OSError as e:
        print(f"pidinit: cannot set ns_last_pid ({e.strerror})", file=sys.stderr)


def _spawn(cmd: list[str], *, session: bool) -> int:
    child = os.fork()
    if child == 0:
        if session:
            os.setsid()  # CRIU wants the dumped tree's session leader inside the tree
        try:
            os.execvp(cmd[0], cmd)
        except OSError as e:
            print(f"pidinit: cannot run {cmd[0]}: {e.strerror}", file=sys.stderr)
            os._exit(127)
    return child


def _forward_to(target: list[int]) -> None:
    def forward(sig: int, _frame) -> None:
        for pid in target:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    for sig in FORWARDED:
        signal.signal(sig, forward)


def _wait_for(main: int) -> int:
    """Reap everything; return the exit status of ``main`` when it ends."""
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return 0
        except InterruptedError:
            continue
        if pid == main:
            return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def main(argv: list[str]) -> int:
    seccomp, exec_only, stdio, restore, first_pid = True, False, None, None, None
    while argv and argv[0] != "--":
        opt = argv.pop(0)
        if opt == "--no-seccomp":
            seccomp = False
        elif opt == "--exec":
            exec_only = True
        elif opt == "--stdio":
            stdio = argv.pop(0)
        elif opt == "--restore":
            restore = Path(argv.pop(0))
        elif opt == "--first-pid":
            first_pid = int(argv.pop(0))
        else:
            print(f"pidinit: unknown option {opt}", file=sys.stderr)
            return 2
    cmd = argv[1:]
    if not cmd:
        print("pidinit: usage: pidinit [--stdio LOG] [--no-seccomp] [--exec | --restore DIR] -- CMD...",
              file=sys.stderr)
        return 2
    if stdio:
        _reopen_stdio(stdio)
    if seccomp and restore is None:  # a restored tree brings its own filters back
        from .seccomp import block_io_uring

        block_io_uring()
    if exec_only:
        # No PID namespace (isolation.pid_namespace false): filter, then become the server.
        try:
            os.execvp(cmd[0], cmd)
        except OSError as e:
            print(f"pidinit: cannot run {cmd[0]}: {e.strerror}", file=sys.stderr)
            return 127
    if os.getpid() != 1:
        print("pidinit: not PID 1 of a PID namespace (run under unshare --pid --fork)", file=sys.stderr)
        return 2
    target: list[int] = []
    _forward_to(target)
    if restore is None:
        if first_pid:  # distinct per model: PID-derived names (abstract sockets) never collide
            _set_last_pid(first_pid - 1)
        target.append(_spawn(cmd, session=True))
        return _wait_for(target[0])
    # Restore: criu (a high PID) restores the tree detached; its root re-parents to us.
    _set_last_pid(_high_pid())
    criu = _spawn(cmd, session=False)
    code = _wait_for(criu)
    if code != 0:
        return code
    server = int((restore / "restore.pid").read_text().strip())
    target.append(server)
    (restore / RESTORED).write_text(str(server))
    return _wait_for(server)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
