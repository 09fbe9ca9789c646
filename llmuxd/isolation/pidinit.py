"""PID 1 of a model tree's own PID namespace.

llmuxd starts every model tree as ``unshare --pid --fork python -m
llmuxd.isolation.pidinit --first-pid N -- CMD...``.  Why a PID namespace per tree: CRIU restores
every process with the PID it had, and in a namespace of its own that PID can never be taken by
anyone else — in this container, or in a fresh container that happens to have started other
processes first.  Clashes are impossible by construction instead of detected after the fact.

The cost: the tree sees its parent's /proc, in which its own (inner) PIDs name other processes.
Code that looks itself up as /proc/<os.getpid()> (psutil.Process(), for one) would find a
stranger.  So the tree's PIDs start high (``--first-pid``, near the top of pid_max), where the
outer namespace has no processes: such a look-up fails cleanly (no such process) instead of
finding — and perhaps signalling — someone else.  /proc/self stays right.

This init: sets ns_last_pid so the server gets ``first-pid``, installs the io_uring seccomp
filter (CRIU cannot dump io_uring), forks and execs the server, forwards termination signals
to it, reaps orphans, and exits with the server's status (the kernel then kills whatever is left
in the namespace).
"""

from __future__ import annotations

import os
import signal
import sys

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def default_first_pid() -> int:
    """High in the PID space: pid_max minus 1/8 of it, at most 1,000,000 below the top."""
    try:
        pid_max = int(open("/proc/sys/kernel/pid_max").read())
    except (OSError, ValueError):
        pid_max = 32768
    return max(300, pid_max - min(pid_max // 8, 1_000_000))


def main(argv: list[str]) -> int:
    first_pid, seccomp, exec_only = None, True, False
    while argv and argv[0] != "--":
        opt = argv.pop(0)
        if opt == "--first-pid":
            first_pid = int(argv.pop(0))
        elif opt == "--no-seccomp":
            seccomp = False
        elif opt == "--exec":
            exec_only = True
        else:
            print(f"pidinit: unknown option {opt}", file=sys.stderr)
            return 2
    cmd = argv[1:]
    if not cmd:
        print("pidinit: usage: pidinit [--first-pid N] [--no-seccomp] [--exec] -- CMD...", file=sys.stderr)
        return 2
    if exec_only:
        # No PID namespace (isolation.pid_namespace false): only install the io_uring filter,
        # then become the server (same PID, no fork), so a tree started without a namespace is
        # still dumpable.
        if seccomp:
            from .seccomp import block_io_uring

            block_io_uring()
        try:
            os.execvp(cmd[0], cmd)
        except OSError as e:
            print(f"pidinit: cannot run {cmd[0]}: {e.strerror}", file=sys.stderr)
            return 127
    if os.getpid() != 1:
        print("pidinit: not PID 1 of a PID namespace (run under unshare --pid --fork)", file=sys.stderr)
        return 2
    os.setsid()  # CRIU wants the tree's session leader inside the tree (it is: us)
    if first_pid:
        try:
            with open("/proc/sys/kernel/ns_last_pid", "w") as f:
                f.write(str(first_pid - 1))
        except OSError as e:
            print(f"pidinit: cannot set ns_last_pid ({e.strerror}); PIDs start low", file=sys.stderr)
    if seccomp:
        from .seccomp import block_io_uring

        block_io_uring()
    child = os.fork()
    if child == 0:
        try:
            os.execvp(cmd[0], cmd)
        except OSError as e:
            print(f"pidinit: cannot run {cmd[0]}: {e.strerror}", file=sys.stderr)
            os._exit(127)
    for sig in FORWARDED:
        signal.signal(sig, lambda s, _f: _forward(child, s))
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return 0
        except InterruptedError:
            continue
        if pid == child:
            return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def _forward(child: int, sig: int) -> None:
    try:
        os.kill(child, sig)
    except ProcessLookupError:
        pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
