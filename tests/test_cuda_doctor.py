"""CUDA suspend orchestration, GPU inventory parsing, and ``llmuxd doctor``.

This machine has no GPU: no libcuda, no NVML, no /dev/nvidia*.  What runs for real here: the
doctor (CRIU, cgroups, systemd, D-Bus and kernel facts of this very machine), gpu_processes() on
real processes, the no-GPU paths of backend selection and inventory.  Where the GPU itself is
needed, a stand-in replaces exactly that and nothing else:

* a fake ``cuda-checkpoint`` shell script keeping a per-pid CUDA state and logging its calls, and
* a fake ``libcuda.so`` compiled here from C, with the driver's cuCheckpoint* signatures,

so the tests check OUR side — the order of lock/checkpoint/restore/unlock over a tree, the
rollback after a failure, the argument passing through ctypes — not CUDA.  On a GPU machine the
doctor test checks the GPU lines against what it finds there.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llmuxd import cuda
from llmuxd.cuda import (
    CudaError, check_restorable, gpu_inventory, gpu_processes, parse_help,
    parse_nvidia_smi, parse_state, resume_tree, select_checkpointer, suspend_tree,
)
from llmuxd.doctor import criu_version_verdict, doctor_facts, run_doctor
from llmuxd.isolation.cgroups import cgroup2_mount

HAS_GPU = any(Path("/dev").glob("nvidia[0-9]*"))
CRIU = shutil.which("criu") or ("/usr/local/bin/criu" if os.path.exists("/usr/local/bin/criu") else None)
GiB = 1024**3
MiB = 1024**2


# ---------------------------------------------------------------------------------------------
# gpu_processes: real processes, and a fake /proc for the positive case
# ---------------------------------------------------------------------------------------------
def test_gpu_processes_real_processes_hold_no_gpu():
    child = subprocess.Popen(["sleep", "30"])
    try:
        pids = [os.getpid(), child.pid, 1, 999_999_999]  # the last one does not exist
        if not HAS_GPU:
            assert gpu_processes(pids) == []
        else:  # on a GPU machine at least these never hold /dev/nvidia*
            assert child.pid not in gpu_processes(pids)
    finally:
        child.kill()
        child.wait()


def test_gpu_processes_scans_fds_and_maps(tmp_path):
    """A fake /proc: 10 has an fd on /dev/nvidia0, 11 maps /dev/nvidiactl, 12 has neither."""
    for pid, fd_target, maps in ((10, "/dev/nvidia0", ""), (11, "/dev/null",
                                  "7f00-7f10 rw-s 00000 00:05 99 /dev/nvidiactl\n"), (12, "pipe:[7]", "")):
        (tmp_path / str(pid) / "fd").mkdir(parents=True)
        os.symlink(fd_target, tmp_path / str(pid) / "fd" / "3")
        (tmp_path / str(pid) / "maps").write_text("55d0-55e0 r-xp 00000 08:01 12 /usr/bin/python3\n" + maps)
    assert gpu_processes([12, 11, 10, 13], proc=tmp_path) == [11, 10]


# ---------------------------------------------------------------------------------------------
# the cuda-checkpoint backend with a stand-in script
# ---------------------------------------------------------------------------------------------
FAKE_CUDA_CHECKPOINT = r"""#!/bin/bash
# Stand-in for NVIDIA's cuda-checkpoint (this machine has no GPU): a per-pid CUDA state in
# $STATE/<pid>, every call appended to $LOG, the transitions the driver allows, and a failure
# injected for FAIL="<op>:<pid>".
STATE=@STATE@; LOG=@LOG@; MODE=@MODE@; FAIL=@FAIL@
echo "$*" >> "$LOG"
if [ "$1" = --help ]; then
  echo "CUDA checkpoint and restore utility."
  echo "--get-state --pid <pid>"
  [ "$MODE" = action ] && echo "--action lock | checkpoint | restore | unlock --pid <pid> [--timeout <ms>]"
  echo "--toggle --pid <pid>"
  exit 0
fi
op=""; pid=""
while [ $# -gt 0 ]; do
  case "$1" in
    --get-state) op=get ;;
    --toggle) op=toggle ;;
    --action) [ "$MODE" = action ] || { echo "unknown option --action" >&2; exit 2; }; op=$2; shift ;;
    --pid) pid=$2; shift ;;
    --timeout) shift ;;
  esac
  shift
done
f="$STATE/$pid"
# what cuda-checkpoint 580 says for a process without CUDA state (seen on the H200)
[ -f "$f" ] || { echo "Error getting process state for process ID $pid: \"initialization error\"" >&2; exit 1; }
st=$(cat "$f")
if [ "$FAIL" = "$op:$pid" ]; then echo "Could not $op process $pid: CUDA_ERROR_OUT_OF_MEMORY" >&2; exit 1; fi
move() { [ "$st" = "$1" ] || { echo "$op: process $pid is $st: CUDA_ERROR_ILLEGAL_STATE" >&2; exit 1; }; echo "$2" > "$f"; }
case "$op" in
  get) echo "$st" ;;
  lock) move running locked ;;
  checkpoint) move locked checkpointed ;;
  restore) move checkpointed locked ;;
  unlock) move locked running ;;
  toggle) if [ "$st" = running ]; then echo checkpointed > "$f"; else move checkpointed running; fi ;;
esac
"""


class FakeTool:
    def __init__(self, tmp: Path, pids, mode="action", fail=""):
        self.state, self.log = tmp / "state", tmp / "calls.log"
        self.state.mkdir()
        for p in pids:
            (self.state / str(p)).write_text("running\n")
        self.path = tmp / "cuda-checkpoint"
        script = FAKE_CUDA_CHECKPOINT
        for k, v in (("STATE", self.state), ("LOG", self.log), ("MODE", mode), ("FAIL", fail or "none")):
            script = script.replace(f"@{k}@", f"'{v}'")
        self.path.write_text(script)
        self.path.chmod(0o755)

    def calls(self, with_state=False) -> list[str]:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [ln for ln in lines if with_state or not ln.startswith(("--get-state", "--help"))]

    def states(self) -> dict[int, str]:
        return {int(f.name): f.read_text().strip() for f in self.state.iterdir()}


def _all(pids):
    return list(pids)


def test_binary_backend_suspends_and_resumes_a_tree_in_order(tmp_path):
    """GPU stand-in: the fake cuda-checkpoint.  Lock all, then checkpoint all; restore all in
    reverse, then unlock all in reverse."""
    tool = FakeTool(tmp_path, [101, 102, 103])
    cp, reason = select_checkpointer(str(tool.path), libcuda=str(tmp_path / "no-libcuda.so"))
    assert cp is not None and cp.kind == "binary" and cp.has_lock
    assert "--action" in reason and "no-libcuda.so not loadable" in reason

    async def go():
        done = await suspend_tree([101, 102, 103], cp, select=_all, lock_timeout_ms=5000)
        mid = tool.states()
        assert await cp.state(101) == "checkpointed"
        resumed = await resume_tree(done, cp)
        return done, mid, resumed

    done, mid, resumed = asyncio.run(go())
    assert done == [101, 102, 103] and resumed == [103, 102, 101]
    assert set(mid.values()) == {"checkpointed"}
    assert tool.calls() == [
        "--action lock --pid 101 --timeout 5000", "--action lock --pid 102 --timeout 5000",
        "--action lock --pid 103 --timeout 5000",
        "--action checkpoint --pid 101", "--action checkpoint --pid 102", "--action checkpoint --pid 103",
        "--action restore --pid 103", "--action restore --pid 102", "--action restore --pid 101",
        "--action unlock --pid 103", "--action unlock --pid 102", "--action unlock --pid 101",
    ]
    assert set(tool.states().values()) == {"running"}


def test_binary_backend_failed_checkpoint_rolls_back(tmp_path):
    """GPU stand-in: the fake cuda-checkpoint fails the checkpoint of 102 (out of memory).  101
    was already checkpointed: it is restored and unlocked; 102 and 103 were only locked: unlocked.
    The driver's message reaches the caller."""
    tool = FakeTool(tmp_path, [101, 102, 103], fail="checkpoint:102")
    cp, _ = select_checkpointer(str(tool.path), libcuda=str(tmp_path / "none.so"))

    with pytest.raises(CudaError) as ei:
        asyncio.run(suspend_tree([101, 102, 103], cp, select=_all, lock_timeout_ms=None))
    assert "CUDA_ERROR_OUT_OF_MEMORY" in str(ei.value) and ei.value.pid == 102
    assert tool.calls() == [
        "--action lock --pid 101", "--action lock --pid 102", "--action lock --pid 103",
        "--action checkpoint --pid 101", "--action checkpoint --pid 102",
        "--action restore --pid 101",
        "--action unlock --pid 103", "--action unlock --pid 102", "--action unlock --pid 101",
    ]
    assert set(tool.states().values()) == {"running"}


def test_binary_backend_failed_lock_unlocks_the_locked(tmp_path):
    tool = FakeTool(tmp_path, [101, 102], fail="lock:102")
    cp, _ = select_checkpointer(str(tool.path), libcuda=str(tmp_path / "none.so"))
    with pytest.raises(CudaError, match="lock"):
        asyncio.run(suspend_tree([101, 102], cp, select=_all, lock_timeout_ms=None))
    assert tool.calls() == ["--action lock --pid 101", "--action lock --pid 102", "--action unlock --pid 101"]
    assert set(tool.states().values()) == {"running"}


def test_binary_backend_failed_restore_is_reported_and_others_resumed(tmp_path):
    tool = FakeTool(tmp_path, [101, 102], fail="restore:101")
    cp, _ = select_checkpointer(str(tool.path), libcuda=str(tmp_path / "none.so"))

    async def go():
        done = await suspend_tree([101, 102], cp, select=_all)
        return await resume_tree(done, cp)

    with pytest.raises(CudaError, match=r"CUDA resume failed: .*restore process 101"):
        asyncio.run(go())
    assert tool.states() == {101: "checkpointed", 102: "running"}


def test_toggle_only_binary(tmp_path):
    """GPU stand-in: an old cuda-checkpoint (driver 550) with only --toggle: one toggle per process
    each way, never toggled from the wrong state."""
    tool = FakeTool(tmp_path, [201, 202], mode="toggle")
    cp, reason = select_checkpointer(str(tool.path), libcuda=str(tmp_path / "none.so"))
    assert cp is not None and not cp.has_lock and "--toggle only" in reason

    async def go():
        done = await suspend_tree([201, 202], cp, select=_all)
        assert tool.states() == {201: "checkpointed", 202: "checkpointed"}
        with pytest.raises(CudaError, match="expected running"):
            await cp.checkpoint(201)  # would toggle the wrong way
        return await resume_tree(done, cp)

    assert asyncio.run(go()) == [202, 201]
    assert tool.calls() == ["--toggle --pid 201", "--toggle --pid 202", "--toggle --pid 202", "--toggle --pid 201"]
    assert set(tool.states().values()) == {"running"}


def test_state_of_a_process_without_cuda(tmp_path):
    tool = FakeTool(tmp_path, [])
    cp, _ = select_checkpointer(str(tool.path), libcuda=str(tmp_path / "none.so"))
    assert asyncio.run(cp.state(os.getpid())) == cuda.NO_CUDA
    assert asyncio.run(resume_tree([os.getpid()], cp)) == []  # nothing to resume, no error


def test_selection_without_any_backend(tmp_path):
    broken = tmp_path / "cuda-checkpoint"  # what the real utility does without libcuda
    broken.write_text("#!/bin/sh\necho 'cuda-checkpoint: error while loading shared libraries: libcuda.so.1: "
                      "cannot open shared object file: No such file or directory' >&2\nexit 127\n")
    broken.chmod(0o755)
    cp, reason = select_checkpointer(str(broken), libcuda=str(tmp_path / "none.so"))
    assert cp is None and "does not run here" in reason and "libcuda.so.1" in reason
    cp, reason = select_checkpointer(str(tmp_path / "absent"), libcuda=str(tmp_path / "none.so"))
    assert cp is None and "not found" in reason and "not loadable" in reason
    if not HAS_GPU:  # this machine: the real defaults
        cp, reason = select_checkpointer()
        assert cp is None and reason.startswith("no CUDA suspend: libcuda.so.1 not loadable")


REAL_HELP_580 = """\
CUDA checkpoint and restore utility.
Version 580.159.04. Copyright (C) 2026 NVIDIA Corporation. All rights reserved.

Operations:
--get-state --pid <pid>
\tPrints the current checkpoint state of the process specified by <pid>

--action lock | checkpoint | restore | unlock --pid <pid> [--timeout <ms>] [--device-map <uuids>]
\tPerforms the specified action on <pid>.
"""  # the head of the real utility's --help with driver 580.159.04 on the H200


def test_help_and_state_parsing():
    assert parse_help(REAL_HELP_580) == {"toggle": False, "get_state": True, "action": True}
    new = ("--get-state --pid <pid>\n--action lock | checkpoint | restore | unlock --pid <pid> [--timeout <ms>]\n"
           "--toggle --pid <pid>\n")
    assert parse_help(new) == {"toggle": True, "get_state": True, "action": True}
    assert parse_help("--get-state --pid <pid>\n--toggle --pid <pid>\n")["action"] is False
    assert parse_help("error while loading shared libraries: libcuda.so.1") is None
    assert parse_state("running\n") == "running"
    assert parse_state("checkpointed") == "checkpointed"
    assert parse_state("Could not get state: CUDA_ERROR_NOT_INITIALIZED") == cuda.NO_CUDA
    assert parse_state('Error getting process state for process ID 422: "initialization error"') == cuda.NO_CUDA
    assert parse_state("???") == "unknown"


# ---------------------------------------------------------------------------------------------
# the driver-API backend with a stand-in libcuda compiled here
# ---------------------------------------------------------------------------------------------
FAKE_LIBCUDA_C = r"""
/* Stand-in for libcuda.so.1 (no GPU here): the cuCheckpoint* signatures of cuda.h, a state per
 * pid (FAKE_CUDA_PIDS=comma list start running; others have no CUDA state), every call logged to
 * FAKE_CUDA_LOG with what arrived through ctypes, FAKE_CUDA_FAIL=<op>:<pid> fails with OOM. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
typedef struct { unsigned int timeoutMs; unsigned int reserved0; unsigned long long reserved1[7]; } LockArgs;
enum { RUNNING, LOCKED, CHECKPOINTED, FAILED };
static int pids[64], states[64], n = -1, inited = 0;
static void load(void) {
    if (n >= 0) return;
    n = 0;
    const char *s = getenv("FAKE_CUDA_PIDS");
    while (s && *s && n < 64) { pids[n] = atoi(s); states[n++] = RUNNING; s = strchr(s, ','); if (s) s++; }
}
static int *st(int pid) { load(); for (int i = 0; i < n; i++) if (pids[i] == pid) return &states[i]; return 0; }
static void logf_(const char *fmt, int pid, long extra) {
    const char *p = getenv("FAKE_CUDA_LOG"); FILE *f = p ? fopen(p, "a") : 0;
    if (f) { fprintf(f, fmt, pid, extra); fputc('\n', f); fclose(f); }
}
static int fail(const char *op, int pid) {
    char want[64]; const char *f = getenv("FAKE_CUDA_FAIL");
    snprintf(want, sizeof want, "%s:%d", op, pid);
    return f && strcmp(f, want) == 0;
}
int cuInit(unsigned int flags) { logf_("cuInit %d", (int)flags, 0); inited = 1; return flags ? 1 : 0; }
int cuDriverGetVersion(int *v) { *v = 13000; return 0; }
int cuGetErrorName(int e, const char **s) {
    *s = e == 2 ? "CUDA_ERROR_OUT_OF_MEMORY" : e == 3 ? "CUDA_ERROR_NOT_INITIALIZED" : e == 401 ? "CUDA_ERROR_ILLEGAL_STATE" : "CUDA_ERROR_UNKNOWN";
    return 0;
}
int cuGetErrorString(int e, const char **s) {
    *s = e == 2 ? "out of memory" : e == 3 ? "initialization error" : e == 401 ? "operation not permitted in the current state" : "unknown error";
    return 0;
}
#define STEP(NAME, OP, FROM, TO) \
int NAME(int pid, void *args) { \
    if (!inited) return 3; \
    logf_(args ? OP " %d args=%ld" : OP " %d", pid, 1); \
    int *s = st(pid); if (!s) return 3; \
    if (fail(OP, pid)) return 2; \
    if (*s != FROM) return 401; \
    *s = TO; return 0; }
STEP(cuCheckpointProcessCheckpoint, "checkpoint", LOCKED, CHECKPOINTED)
STEP(cuCheckpointProcessRestore, "restore", CHECKPOINTED, LOCKED)
STEP(cuCheckpointProcessUnlock, "unlock", LOCKED, RUNNING)
int cuCheckpointProcessLock(int pid, LockArgs *args) {
    if (!inited) return 3;
    if (args) { for (int i = 0; i < 7; i++) if (args->reserved1[i] || args->reserved0) return 1; }
    logf_("lock %d timeout=%ld", pid, args ? (long)args->timeoutMs : -1L);
    int *s = st(pid); if (!s) return 3;
    if (fail("lock", pid)) return 2;
    if (*s != RUNNING) return 401;
    *s = LOCKED; return 0;
}
int cuCheckpointProcessGetState(int pid, int *state) {
    if (!inited) return 3;
    int *s = st(pid); if (!s) return 3;
    *state = *s; return 0;
}
"""


@pytest.fixture(scope="module")
def fake_libcuda_src(tmp_path_factory) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the libcuda stand-in")
    d = tmp_path_factory.mktemp("libcuda")
    src = d / "fake_libcuda.c"
    src.write_text(FAKE_LIBCUDA_C)
    out = d / "libcuda-fake.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(out), str(src)], check=True, capture_output=True)
    return out


@pytest.fixture
def fake_libcuda(fake_libcuda_src, tmp_path, monkeypatch):
    """A private copy (dlopen of a new path = fresh library state), its log and env."""
    lib = tmp_path / "libcuda.so.1"
    shutil.copy(fake_libcuda_src, lib)
    log = tmp_path / "cuda.log"
    monkeypatch.setenv("FAKE_CUDA_LOG", str(log))
    monkeypatch.setenv("FAKE_CUDA_PIDS", "301,302")
    monkeypatch.delenv("FAKE_CUDA_FAIL", raising=False)
    return lib, log


def test_driver_backend_through_ctypes(fake_libcuda, tmp_path):
    """GPU stand-in: a C libcuda with cuda.h's signatures.  Checks our ctypes declarations reach
    C as intended (pid, NULL args, the lock timeout struct, the state out-parameter) and the
    tree order."""
    lib, log = fake_libcuda
    cp, reason = select_checkpointer(str(tmp_path / "no-cuda-checkpoint"), libcuda=str(lib))
    assert cp is not None and cp.kind == "driver" and "CUDA 13.0" in reason

    async def go():
        assert await cp.state(301) == "running"
        assert await cp.state(999) == cuda.NO_CUDA  # CUDA_ERROR_NOT_INITIALIZED: no CUDA in it
        done = await suspend_tree([301, 302, 999], cp, select=lambda p: [x for x in p if x != 999],
                                  lock_timeout_ms=1234)
        assert [await cp.state(p) for p in done] == ["checkpointed", "checkpointed"]
        return await resume_tree(done, cp)

    assert asyncio.run(go()) == [302, 301]
    assert log.read_text().splitlines() == [
        "cuInit 0", "lock 301 timeout=1234", "lock 302 timeout=1234", "checkpoint 301", "checkpoint 302",
        "restore 302", "restore 301", "unlock 302", "unlock 301",
    ]


def test_driver_backend_error_strings_and_rollback(fake_libcuda, tmp_path, monkeypatch):
    lib, log = fake_libcuda
    monkeypatch.setenv("FAKE_CUDA_FAIL", "checkpoint:302")
    cp, _ = select_checkpointer(str(tmp_path / "none"), libcuda=str(lib))
    with pytest.raises(CudaError) as ei:
        asyncio.run(suspend_tree([301, 302], cp, select=_all, lock_timeout_ms=None))
    e = ei.value
    assert e.code == 2 and e.pid == 302
    assert str(e) == "cuCheckpointProcessCheckpoint(302) failed: CUDA_ERROR_OUT_OF_MEMORY: out of memory"
    assert log.read_text().splitlines()[1:] == [
        "lock 301 timeout=-1", "lock 302 timeout=-1", "checkpoint 301", "checkpoint 302",
        "restore 301", "unlock 302", "unlock 301",
    ]
    assert [asyncio.run(cp.state(p)) for p in (301, 302)] == ["running", "running"]


def test_driver_backend_missing_symbols_falls_back(tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    src = tmp_path / "old.c"  # a pre-570 driver: no cuCheckpoint*
    src.write_text("int cuInit(unsigned f){return 0;}\nint cuDriverGetVersion(int*v){*v=12040;return 0;}\n"
                   "int cuGetErrorName(int e,const char**s){*s=\"X\";return 0;}\n"
                   "int cuGetErrorString(int e,const char**s){*s=\"x\";return 0;}\n")
    lib = tmp_path / "libcuda-old.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    tool = FakeTool(tmp_path, [1])
    cp, reason = select_checkpointer(str(tool.path), libcuda=str(lib))
    assert cp.kind == "binary" and "has no cuCheckpointProcessLock" in reason and "driver >= 570" in reason


# ---------------------------------------------------------------------------------------------
# GPU inventory and the restore preflight
# ---------------------------------------------------------------------------------------------
NVIDIA_SMI_SAMPLE = """\
0, NVIDIA H200, GPU-6f3c7a0e-1b2d-4c5e-8f90-0a1b2c3d4e5f, 143771, 136900, 580.159.04
1, NVIDIA H200, GPU-11111111-2222-3333-4444-555555555555, 143771, [N/A], 580.159.04
"""


def test_parse_nvidia_smi():
    inv = parse_nvidia_smi(NVIDIA_SMI_SAMPLE)
    assert inv["source"] == "nvidia-smi" and inv["driver_version"] == "580.159.04"
    g0, g1 = inv["gpus"]
    assert g0 == {"index": 0, "name": "NVIDIA H200", "uuid": "GPU-6f3c7a0e-1b2d-4c5e-8f90-0a1b2c3d4e5f",
                  "memory_total": 143771 * MiB, "memory_free": 136900 * MiB, "memory_used": 6871 * MiB}
    assert g1["memory_free"] is None and g1["memory_used"] is None
    assert parse_nvidia_smi("") is None
    assert parse_nvidia_smi("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.") is None
    odd = parse_nvidia_smi("3, Weird, Name, GPU-x, 100, 50, 1.0\n")["gpus"][0]
    assert odd["name"] == "Weird, Name" and odd["uuid"] == "GPU-x"


def test_gpu_inventory_here(tmp_path):
    assert gpu_inventory(nvml=str(tmp_path / "none.so"), nvidia_smi=str(tmp_path / "none")) is None
    if not HAS_GPU:
        assert gpu_inventory() is None
    else:
        inv = gpu_inventory()
        assert inv and inv["gpus"] and inv["driver_version"]


def _inv(*gpus, driver="580.159.04"):
    return {"source": "nvml", "driver_version": driver, "gpus": [
        {"index": i, "name": name, "uuid": f"GPU-{i}", "memory_total": 140 * GiB, "memory_free": free}
        for i, (name, free) in enumerate(gpus)]}


def test_check_restorable():
    rec = _inv(("NVIDIA H200", 130 * GiB))
    assert check_restorable(rec, 7 * GiB, _inv(("NVIDIA H200", 100 * GiB))) == []
    problems = check_restorable(rec, 7 * GiB, _inv(("NVIDIA H100", 5 * GiB), ("NVIDIA H100", 80 * GiB),
                                                   driver="575.51.03"))
    assert problems == [
        "NVIDIA driver differs: 580.159.04 at checkpoint, 575.51.03 here",
        "GPU count differs: 1 at checkpoint, 2 here",
        "GPU model differs on device 0: NVIDIA H200 at checkpoint, NVIDIA H100 here",
        "not enough free memory on device 0 (NVIDIA H100): need 7.0 GiB, free 5.0 GiB",
    ]
    assert check_restorable(rec, 1, None) == ["no NVIDIA GPU here; the checkpoint was taken on 1 GPU(s) (NVIDIA H200)"]
    two = _inv(("NVIDIA H200", 130 * GiB), ("NVIDIA H200", 130 * GiB))
    now = _inv(("NVIDIA H200", 50 * GiB), ("NVIDIA H200", 2 * GiB))
    assert check_restorable(two, {"GPU-0": 40 * GiB, 1: 3 * GiB}, now) == [
        "not enough free memory on device 1 (NVIDIA H200): need 3.0 GiB, free 2.0 GiB"]
    assert check_restorable({}, 0, None) == []  # a CPU checkpoint restored on a CPU machine


# ---------------------------------------------------------------------------------------------
# doctor
# ---------------------------------------------------------------------------------------------
def _line(out: str, item: str) -> str:
    found = [ln for ln in out.splitlines() if re.match(rf"\s+(OK|WARN|NO)\s+{re.escape(item)}\s", ln)]
    assert found, f"no line for {item!r} in:\n{out}"
    return found[0]


def test_doctor_on_this_machine(capsys):
    """Real: the doctor on this very machine, each line checked against what the machine is."""
    rc = run_doctor(None)
    out = capsys.readouterr().out
    assert rc == 0, out
    if CRIU:
        assert re.match(r"\s+OK\s+criu version\s+4\.2\.\d+ \(>= 4\.2 required\)", _line(out, "criu version")), out
        assert re.match(r"\s+OK\s+criu check\s+Looks good", _line(out, "criu check")), out
    if not HAS_GPU:
        assert re.match(r"\s+WARN\s+GPU\s+no NVIDIA GPU", _line(out, "GPU"))
        assert "WARN" in _line(out, "CUDA suspend")
    mount = cgroup2_mount()
    if mount == Path("/sys/fs/cgroup/unified"):
        assert re.match(r"\s+OK\s+cgroup v2\s+hybrid at /sys/fs/cgroup/unified", _line(out, "cgroup v2"))
    elif mount == Path("/sys/fs/cgroup"):
        assert re.match(r"\s+OK\s+cgroup v2\s+pure at /sys/fs/cgroup", _line(out, "cgroup v2"))
    pid1 = Path("/proc/1/comm").read_text().strip()
    if not os.path.isdir("/run/systemd/system"):
        assert re.match(rf"\s+WARN\s+PID 1\s+{re.escape(pid1)}, not systemd", _line(out, "PID 1"))
    assert out.rstrip().splitlines()[-1].startswith("READY")


def _config(tmp_path: Path, process: str, criu_path: str) -> Path:
    cfg = {"models": {"m1": {"model_path": "org/a", "port": 8001,
                             "eviction": {"weights": "discard", "process": process}},
                      "m2": {"model_path": "org/b", "port": 8002}},
           "checkpoint": {"criu_path": criu_path, "cuda_checkpoint_path": str(tmp_path / "no-cuda-checkpoint")}}
    path = tmp_path / f"config-{process}.json"
    path.write_text(json.dumps(cfg))
    return path


def test_doctor_missing_criu_for_a_checkpoint_model(tmp_path, capsys):
    missing = str(tmp_path / "nowhere" / "criu")
    rc = run_doctor(_config(tmp_path, "checkpoint", missing))
    out = capsys.readouterr().out
    assert rc == 1, out
    line = _line(out, "criu binary")
    assert line.split()[0] == "NO"
    assert f"{missing} not found (needed by m1: process eviction `checkpoint`)" in line
    assert "install-criu.sh" in line
    assert out.rstrip().splitlines()[-1].startswith("NOT READY: 1 thing(s)")
    # The same machine and CRIU, no model that checkpoints: llmuxd runs, CRIU is only a warning.
    rc = run_doctor(_config(tmp_path, "stop", missing))
    out = capsys.readouterr().out
    assert rc == 0 and _line(out, "criu binary").split()[0] == "WARN", out


def test_doctor_invalid_config_is_an_error(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"models": {}}')
    assert run_doctor(bad) == 1
    assert _line(capsys.readouterr().out, "config").split()[0] == "NO"


def test_doctor_json(tmp_path):
    facts = doctor_facts(_config(tmp_path, "cuda_suspend", "criu"))
    json.dumps(facts)  # machine-readable as it is
    assert set(facts) == {"config", "facts", "checks", "exit_code"}
    assert set(facts["facts"]) == {"criu", "cuda", "cgroup", "systemd", "dbus", "kernel", "trust"}
    assert facts["facts"]["kernel"]["release"] == os.uname().release
    if not HAS_GPU:
        assert facts["facts"]["cuda"]["gpu"] is None and facts["exit_code"] == 0  # nothing to suspend here
        sus = [c for c in facts["checks"] if c["item"] == "CUDA suspend"][0]
        assert sus["status"] == "WARN" and "no NVIDIA GPU" in sus["detail"]


def test_doctor_gpu_machine_without_cuda_suspend_is_an_error():
    """Judgement only (pure): a GPU machine, a cuda_suspend model, no backend -> NO, exit 1."""
    from llmuxd.config import parse_config
    from llmuxd.doctor import assess, exit_code, gather_facts

    config = parse_config({"models": {"m1": {"model_path": "a", "port": 8001,
                                             "eviction": {"process": "cuda_suspend"}}}})
    facts = gather_facts(config)
    facts["cuda"].update(gpu=_inv(("NVIDIA H200", 100 * GiB)), selected=None, plugin=None,
                         selected_detail="no CUDA suspend: libcuda.so.1 not loadable")
    checks = assess(facts, config)
    sus = [c for c in checks if c.item == "CUDA suspend"][0]
    assert sus.status == "NO" and sus.required and "needed by m1" in sus.detail
    assert exit_code(checks) == 1


def test_criu_version_verdicts():
    assert criu_version_verdict((4, 2, 1), (6, 18))[0] == "OK"
    st, why = criu_version_verdict((3, 17, 1), (6, 18))
    assert st == "NO" and "vdso" in why
    st, why = criu_version_verdict((4, 1), (6, 18))
    assert st == "NO" and "TCP" in why and "6.18" in why
    assert criu_version_verdict(None, (6, 18))[0] == "NO"


def test_one_network_lock_decision_for_the_daemon_and_doctor(monkeypatch):
    """The daemon's dumps and `llmuxd doctor` use the same choice (they once disagreed on an
    H200: doctor said nftables, the daemon used skip), with and without iptables-restore."""
    import asyncio

    from llmuxd.checkpoint.criu import Criu, network_lock_method
    from llmuxd.doctor import criu_facts

    criu = "/usr/local/bin/criu"
    if not os.path.exists(criu):
        pytest.fail("CRIU is not installed (scripts/setup.sh installs it)")
    seen = set()
    for path in (f"/usr/sbin:/sbin:{os.environ['PATH']}", "/usr/local/bin:/usr/bin:/bin"):
        monkeypatch.setenv("PATH", path)
        method, why = network_lock_method(criu)
        assert method in ("iptables", "nftables", "skip") and why
        assert asyncio.run(Criu(criu).network_lock()) == method
        assert criu_facts(criu)["network_lock"] == method
        assert (method == "iptables") == bool(shutil.which("iptables-restore")), (path, method, why)
        seen.add(method)
    print(seen)


def test_doctor_cli_entry_point_runs_as_a_process(tmp_path):
    """The function the CLI will call, in a fresh interpreter (as ``llmuxd doctor`` will)."""
    cfg = _config(tmp_path, "checkpoint", str(tmp_path / "none" / "criu"))
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from llmuxd.doctor import run_doctor
        sys.exit(run_doctor({str(cfg)!r}, as_json=True))""")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    assert json.loads(r.stdout)["exit_code"] == 1


@pytest.mark.skipif(not shutil.which("dbus-daemon"), reason="no dbus-daemon")
def test_doctor_connects_to_a_real_bus(tmp_path, monkeypatch):
    """A real dbus-daemon (session config, private socket) stands where the system bus would be."""
    import time

    from llmuxd.api.dbus import bus_socket_paths
    from llmuxd.doctor import dbus_facts

    assert bus_socket_paths("unix:path=/a,guid=x;tcp:host=h,port=1;unix:abstract=z") == ["/a"]

    sock = tmp_path / "bus"
    proc = subprocess.Popen(["dbus-daemon", "--session", "--nofork", "--nopidfile", f"--address=unix:path={sock}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if sock.exists():
                break
            time.sleep(0.01)
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={sock}")
        f = dbus_facts()
        assert f["socket"] == str(sock) and f["connect"] and f["connect_detail"] == "connected", f
    finally:
        proc.kill()
        proc.wait()
    f = dbus_facts(timeout=0.5)  # the socket file is left, nobody listens
    assert not f["connect"] and f["connect_detail"]
