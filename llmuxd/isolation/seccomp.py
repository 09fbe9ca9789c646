"""A seccomp filter that makes io_uring unavailable to a model tree.

vLLM's API server runs uvloop, whose libuv (>= 1.49) always sets up an io_uring; CRIU cannot dump
io_uring instances.  With io_uring_setup/enter/register failing with EPERM (what Docker's default
seccomp profile does), libuv falls back to epoll and the tree becomes dumpable.  Everything else
is allowed.  Installed in the tree's init before it execs the server, so every descendant
inherits it (seccomp filters are inherited across fork and exec, and CRIU dumps and restores them).
"""

from __future__ import annotations

import ctypes
import errno
import platform
import struct

# Generic syscall numbers, the same on x86_64 and aarch64.
IO_URING_SYSCALLS = (425, 426, 427)  # io_uring_setup, io_uring_enter, io_uring_register

_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_PR_SET_NO_NEW_PRIVS = 38

# classic BPF
_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_RET_K = 0x06  # BPF_RET | BPF_K
_SECCOMP_RET_ALLOW = 0x7FFF0000
_SECCOMP_RET_ERRNO = 0x00050000
_OFF_NR, _OFF_ARCH = 0, 4  # struct seccomp_data


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def io_uring_filter(arch: int) -> bytes:
    """The BPF program: other architectures and other syscalls pass; io_uring gets EPERM."""
    prog = [
        _insn(_LD_W_ABS, 0, 0, _OFF_ARCH),
        _insn(_JEQ_K, 1, 0, arch),  # our arch: go on; else allow (never break foreign ABIs)
        _insn(_RET_K, 0, 0, _SECCOMP_RET_ALLOW),
        _insn(_LD_W_ABS, 0, 0, _OFF_NR),
    ]
    n = len(IO_URING_SYSCALLS)
    for i, nr in enumerate(IO_URING_SYSCALLS):
        # match: jump to the EPERM return (after the remaining checks and the ALLOW)
        prog.append(_insn(_JEQ_K, n - i, 0, nr))
    prog.append(_insn(_RET_K, 0, 0, _SECCOMP_RET_ALLOW))
    prog.append(_insn(_RET_K, 0, 0, _SECCOMP_RET_ERRNO | errno.EPERM))
    return b"".join(prog)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def block_io_uring() -> None:
    """Install the filter on the calling process (and so on everything it starts)."""
    arch = _AUDIT_ARCH.get(platform.machine())
    if arch is None:
        raise OSError(errno.ENOSYS, f"no io_uring seccomp filter for {platform.machine()}")
    prog = io_uring_filter(arch)
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = _SockFprog(len(prog) // 8, ctypes.cast(buf, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    # Root (CAP_SYS_ADMIN) may install filters without no_new_privs; others need it.
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0) != 0:
        libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, None, 0, 0)
        if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"cannot install the io_uring seccomp filter: {errno.errorcode.get(e, e)}")
