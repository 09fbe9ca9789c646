"""x86 dynamically enabled XSTATE features (AMX) across a restore.

A process must ask the kernel for the right to use AMX tiles (``arch_prctl(ARCH_REQ_XCOMP_PERM,
XTILEDATA)``: oneDNN, and so torch on the CPU, does it on AMX machines such as GPU servers).
The right belongs to the process: a child inherits it at fork, exec clears it, and CRIU
neither dumps nor restores it.  A restored process that used AMX before its dump therefore
dies of SIGILL at its next AMX instruction (measured on an H200 host: docs/measured.md).

On a host with AMX llmuxd restores a tree stopped (``criu restore --leave-stopped``), has every
restored process ask for the right itself — one ``arch_prctl`` run in the process under ptrace,
at a ``syscall`` instruction of its vDSO, its registers put back after — and then lets the tree
run.  Asking for the right changes nothing for a process that never uses AMX.
"""

from __future__ import annotations

import ctypes
import os
import signal
from pathlib import Path

from . import procfs

SYS_ARCH_PRCTL = 158
ARCH_GET_XCOMP_SUPP, ARCH_GET_XCOMP_PERM, ARCH_REQ_XCOMP_PERM = 0x1021, 0x1022, 0x1023
XTILEDATA = 18  # the AMX tile data component: asking for it enables AMX

_PTRACE_GETREGS, _PTRACE_SETREGS, _PTRACE_SINGLESTEP, _PTRACE_DETACH = 12, 13, 9, 17
_PTRACE_SEIZE, _PTRACE_INTERRUPT = 0x4206, 0x4207
_WALL = 0x40000000
_SYSCALL = b"\x0f\x05"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]


class XstateError(Exception):
    """A restored process could not be given its right back."""


class _Regs(ctypes.Structure):  # struct user_regs_struct (x86_64)
    _fields_ = [(n, ctypes.c_ulonglong) for n in (
        "r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi orig_rax rip cs eflags rsp ss "
        "fs_base gs_base ds es fs gs").split()]


def _xcomp(op: int) -> int | None:
    value = ctypes.c_uint64()
    return value.value if _libc.syscall(SYS_ARCH_PRCTL, op, ctypes.byref(value)) == 0 else None


def amx_here() -> bool:
    """Whether this machine (CPU and kernel) offers AMX to processes that ask for it."""
    if os.uname().machine != "x86_64":
        return False
    return bool((_xcomp(ARCH_GET_XCOMP_SUPP) or 0) >> XTILEDATA & 1)


def _syscall_at(pid: int) -> int:
    """The address of a ``syscall`` instruction in the process's vDSO (the kernel's code, the
    same in every process: nothing of the process's own memory is trusted or changed)."""
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        if line.endswith("[vdso]"):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
            try:
                code = os.pread(fd, hi - lo, lo)
            finally:
                os.close(fd)
            if (i := code.find(_SYSCALL)) >= 0:
                return lo + i
    raise XstateError(f"process {pid}: no vDSO with a syscall instruction")


def _ptrace(op: int, pid: int, data: object = None) -> None:
    if _libc.ptrace(op, pid, None, data) != 0:
        e = ctypes.get_errno()
        raise XstateError(f"process {pid}: ptrace {op:#x}: {os.strerror(e)}")


def request_in(pid: int, feature: int = XTILEDATA) -> int:
    """Run ``arch_prctl(ARCH_REQ_XCOMP_PERM, feature)`` inside process ``pid`` (stopped or
    running; left as it was found, registers and a pending stop included).  Returns the call's result: 0, or
    ``-errno`` (``-EOPNOTSUPP`` where the machine has no such feature)."""
    at = _syscall_at(pid)
    # Stopped (as a restore leaves it): stopped again at detach, by the signal that stopped it.
    st = procfs.stat(pid)
    pending = signal.SIGSTOP if st is not None and st.state == "T" else 0
    _ptrace(_PTRACE_SEIZE, pid)
    try:
        _ptrace(_PTRACE_INTERRUPT, pid)
        os.waitpid(pid, _WALL)
        saved, regs = _Regs(), _Regs()
        _ptrace(_PTRACE_GETREGS, pid, ctypes.byref(saved))
        ctypes.pointer(regs)[0] = saved
        regs.rip, regs.rax, regs.orig_rax = at, SYS_ARCH_PRCTL, ctypes.c_ulonglong(-1).value
        regs.rdi, regs.rsi = ARCH_REQ_XCOMP_PERM, feature
        _ptrace(_PTRACE_SETREGS, pid, ctypes.byref(regs))
        for _ in range(8):  # a stop for a pending signal (a restore's SIGSTOP) may come first
            _ptrace(_PTRACE_SINGLESTEP, pid)
            _, status = os.waitpid(pid, _WALL)
            if os.WIFSTOPPED(status) and status >> 16 == 0 and os.WSTOPSIG(status) != signal.SIGTRAP:
                pending = os.WSTOPSIG(status)  # a signal that arrived meanwhile: delivered at detach
            _ptrace(_PTRACE_GETREGS, pid, ctypes.byref(regs))
            if regs.rip == at + len(_SYSCALL):
                break
        else:
            raise XstateError(f"process {pid}: the arch_prctl did not run")
        _ptrace(_PTRACE_SETREGS, pid, ctypes.byref(saved))
        return ctypes.c_longlong(regs.rax).value
    finally:
        _libc.ptrace(_PTRACE_DETACH, pid, None, ctypes.c_void_p(pending))


def give_back_amx(pids: list[int]) -> None:
    """Give each process the right to use AMX (see the module's docstring); raises XstateError
    naming the first process that could not get it."""
    for pid in pids:
        try:
            result = request_in(pid)
        except (OSError, XstateError) as e:
            raise XstateError(f"AMX right for restored process {pid}: {e}") from None
        if result != 0:
            raise XstateError(f"AMX right for restored process {pid}: arch_prctl: {os.strerror(-result)}")


__all__ = ["XTILEDATA", "XstateError", "amx_here", "give_back_amx", "request_in"]
