"""Does a process's permission to use AMX (``arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)``)
survive fork, exec, and a CRIU dump and restore?  Run as root on an x86 host with AMX (GPU
servers are); prints and writes JSON.  A worker that has the permission runs an AMX
instruction (``tilezero``) every 0.1 s, from machine code placed in an executable page, and
reports each round; without the permission the kernel answers that instruction with SIGILL.

  python3 amx_probe.py --criu PATH --out FILE [--workdir DIR]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from llmuxd.isolation.xstate import request_in  # what llmuxd does after a restore on an AMX host

SYS_ARCH_PRCTL = 158
ARCH_GET_XCOMP_SUPP, ARCH_GET_XCOMP_PERM, ARCH_REQ_XCOMP_PERM = 0x1021, 0x1022, 0x1023
XTILEDATA = 18
_libc = ctypes.CDLL(None, use_errno=True)

# ldtilecfg [rdi]; tilezero tmm0; tilerelease; ret
_CODE = bytes.fromhex("c4e2784907" "c4e27b49c0" "c4e27849c0" "c3")


def xcomp(op: int) -> int | None:
    v = ctypes.c_uint64()
    return v.value if _libc.syscall(SYS_ARCH_PRCTL, op, ctypes.byref(v)) == 0 else None


def request() -> int:
    return _libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XTILEDATA)


def has_perm() -> bool:
    return bool((xcomp(ARCH_GET_XCOMP_PERM) or 0) >> XTILEDATA & 1)


def amx_function():
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(_CODE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(page))
    fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(addr)
    cfg = (ctypes.c_uint8 * 64)()
    cfg[0] = 1  # palette 1
    cfg[16] = 64  # tmm0: 64 bytes a row
    cfg[48] = 16  # tmm0: 16 rows
    return lambda: fn(ctypes.addressof(cfg)), (page, cfg)


def worker(out: str) -> None:
    request()
    run, keep = amx_function()
    n = 0
    with open(out, "a", buffering=1) as f:
        while True:
            run()
            n += 1
            f.write(f"{n} perm={int(has_perm())}\n")
            time.sleep(0.1)


def child_perm(exec_: bool) -> bool | None:
    if exec_:
        r = subprocess.run([sys.executable, __file__, "perm"], capture_output=True, text=True)
        return r.stdout.strip() == "1"
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(w, b"1" if has_perm() else b"0")
        os._exit(0)
    os.waitpid(pid, 0)
    return os.read(r, 1) == b"1"


def lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except OSError:
        return []


def dump_restore(criu: str, work: Path, via_perm_parent: bool = False, inject: bool = False) -> dict:
    """Start a worker, dump it, restore it (criu started by a process that holds the
    permission when ``via_perm_parent``; restored stopped, given the permission by llmuxd's
    isolation.xstate.request_in, then continued when ``inject``), and watch what the restored worker does."""
    tag = "inject" if inject else "parent" if via_perm_parent else "plain"
    d, out = work / f"img-{tag}", work / f"worker-{tag}.log"
    d.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    w = subprocess.Popen([sys.executable, __file__, "worker", str(out)], start_new_session=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    res: dict = {"rounds_before_dump": len(lines(out))}
    r = subprocess.run([criu, "dump", "-t", str(w.pid), "-D", str(d), "-o", "dump.log", "-v4"],
                       capture_output=True, text=True)
    w.wait()
    res["dump_rc"] = r.returncode
    if r.returncode != 0:
        res["dump_log_tail"] = (d / "dump.log").read_text()[-2000:] if (d / "dump.log").exists() else r.stderr
        return res
    n0 = len(lines(out))
    argv = [criu, "restore", "-D", str(d), "-o", "restore.log", "-v4", "-d", "--pidfile", str(d / "pid")]
    if inject:
        argv.append("--leave-stopped")
    if via_perm_parent:  # the permission is requested, then criu exec'd from this process
        code = ("import ctypes,os,sys; l=ctypes.CDLL(None); "
                f"l.syscall({SYS_ARCH_PRCTL},{ARCH_REQ_XCOMP_PERM},{XTILEDATA}); os.execv(sys.argv[1], sys.argv[1:])")
        argv = [sys.executable, "-c", code] + argv
    r = subprocess.run(argv, capture_output=True, text=True)
    res["restore_rc"] = r.returncode
    if r.returncode != 0:
        res["restore_log_tail"] = (d / "restore.log").read_text()[-2000:] if (d / "restore.log").exists() else r.stderr
        return res
    pid = int((d / "pid").read_text())
    if inject:
        try:
            res["grant_rc"] = request_in(pid)
        except Exception as e:  # noqa: BLE001 - reported
            res["grant_error"] = f"{type(e).__name__}: {e}"
        os.kill(pid, signal.SIGCONT)
    time.sleep(1.5)
    after = lines(out)[n0:]
    res["rounds_after_restore"] = len(after)
    res["last_lines"] = after[-2:]
    st = Path(f"/proc/{pid}/stat")
    res["state_after_1_5s"] = st.read_text().rsplit(")", 1)[1].split()[0] if st.exists() else "gone"
    res["alive_after_1_5s"] = res["state_after_1_5s"] not in ("gone", "Z", "X")
    if res["alive_after_1_5s"]:
        os.kill(pid, signal.SIGKILL)
    else:
        res["kernel_log"] = [x for x in subprocess.run(["dmesg"], capture_output=True, text=True).stdout.splitlines()
                             if "NVRM" not in x][-5:]
    return res


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "perm":
        print(int(has_perm()))
        return 0
    if len(sys.argv) > 2 and sys.argv[1] == "worker":
        worker(sys.argv[2])
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("--criu", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--workdir", default="/var/tmp/llmuxd-amx-probe")
    a = ap.parse_args()
    fatal = Path("/proc/sys/kernel/print-fatal-signals")  # the kernel logs a SIGILL that kills
    try:
        fatal.write_text("1")
    except OSError:
        pass
    supp = xcomp(ARCH_GET_XCOMP_SUPP) or 0
    facts: dict = {"supported_mask": hex(supp), "amx": bool(supp >> XTILEDATA & 1),
                   "perm_before": has_perm()}
    if facts["amx"]:
        facts["request_rc"] = request()
        facts["perm_after_request"] = has_perm()
        facts["perm_in_forked_child"] = child_perm(exec_=False)
        facts["perm_after_exec"] = child_perm(exec_=True)
        work = Path(a.workdir)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        facts["dump_restore"] = dump_restore(a.criu, work)
        facts["dump_restore_criu_from_a_permitted_parent"] = dump_restore(a.criu, work, via_perm_parent=True)
        facts["dump_restore_stopped_then_granted_by_ptrace"] = dump_restore(a.criu, work, inject=True)
    Path(a.out).write_text(json.dumps(facts, indent=1))
    print(json.dumps(facts, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
