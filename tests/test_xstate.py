"""The AMX right of a restored process (llmuxd/isolation/xstate.py): llmuxd runs one
arch_prctl inside a process under ptrace and leaves it exactly as it was.  Here (a machine
without AMX the call answers EOPNOTSUPP) the test checks the mechanics: the call runs in the
target, whether it was running or stopped as a restore leaves it, and the target goes on with
its registers and its work intact.  On an AMX host (the GPU run's tests/gpu/amx_probe.py) the
call answers 0 and a restored AMX worker runs on instead of dying of SIGILL."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

import pytest

from harness import wait_until
from llmuxd.isolation import procfs, xstate

pytestmark = pytest.mark.skipif(os.uname().machine != "x86_64" or os.geteuid() != 0,
                                reason="x86_64 and root (ptrace) only")

COUNTER = "import time\nt = 0\nfor i in range(60):\n    t += i * i\n    time.sleep(0.02)\nprint(t, flush=True)\n"


def state(pid: int) -> str | None:
    st = procfs.stat(pid)
    return st.state if st is not None else None


def expected_result() -> int:
    return 0 if xstate.amx_here() else -errno.EOPNOTSUPP


@pytest.mark.parametrize("stopped", [False, True], ids=["running", "stopped"])
def test_arch_prctl_runs_inside_the_process_and_leaves_it_intact(stopped):
    p = subprocess.Popen([sys.executable, "-c", COUNTER], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)
        if stopped:  # as `criu restore --leave-stopped` leaves a tree
            os.kill(p.pid, signal.SIGSTOP)
            time.sleep(0.1)
        assert xstate.request_in(p.pid) == expected_result()
        if stopped:
            wait_until(lambda: state(p.pid) == "T", 5, what="the process stopped again (as it was found)")
            time.sleep(0.2)
            assert state(p.pid) == "T"
            os.kill(p.pid, signal.SIGCONT)
        out, _ = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0 and int(out) == sum(i * i for i in range(60))


def test_give_back_amx_names_the_process_it_could_not_serve():
    p = subprocess.Popen([sys.executable, "-c", COUNTER], stdout=subprocess.DEVNULL)
    try:
        if xstate.amx_here():
            xstate.give_back_amx([p.pid])
        else:
            with pytest.raises(xstate.XstateError, match=f"restored process {p.pid}: arch_prctl"):
                xstate.give_back_amx([p.pid])
        gone = subprocess.Popen(["true"])
        gone.wait()
        with pytest.raises(xstate.XstateError, match=f"restored process {gone.pid}"):
            xstate.give_back_amx([gone.pid])
        assert p.wait(30) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
