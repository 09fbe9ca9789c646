"""The two ways to suspend one process's CUDA state from outside it, and their errors.

* the CUDA driver API through ctypes on ``libcuda.so.1`` (driver >= 570):
  ``cuCheckpointProcessLock / Checkpoint / Restore / Unlock / GetState``;
* NVIDIA's ``cuda-checkpoint`` utility: ``--action lock|checkpoint|restore|unlock`` on newer
  builds, only ``--toggle`` (running <-> checkpointed) on older ones.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import shutil
import subprocess
import threading

log = logging.getLogger(__name__)

LIBCUDA = "libcuda.so.1"

# CUprocessState
PROCESS_STATES = {0: "running", 1: "locked", 2: "checkpointed", 3: "failed", 4: "checkpointing", 5: "restoring"}
#: state() of a process without CUDA state (the driver answers CUDA_ERROR_NOT_INITIALIZED).
NO_CUDA = "none"

# CUresult codes used here by number (names come from cuGetErrorName when the driver is there).
CUDA_SUCCESS = 0
CUDA_ERROR_NOT_INITIALIZED = 3
_CUDA_ERROR_NAMES = {
    1: "CUDA_ERROR_INVALID_VALUE", 2: "CUDA_ERROR_OUT_OF_MEMORY", 3: "CUDA_ERROR_NOT_INITIALIZED",
    100: "CUDA_ERROR_NO_DEVICE", 304: "CUDA_ERROR_OPERATING_SYSTEM", 401: "CUDA_ERROR_ILLEGAL_STATE",
    801: "CUDA_ERROR_NOT_SUPPORTED", 909: "CUDA_ERROR_TIMEOUT",
}

CHECKPOINT_SYMBOLS = (
    "cuCheckpointProcessLock", "cuCheckpointProcessCheckpoint", "cuCheckpointProcessRestore",
    "cuCheckpointProcessUnlock", "cuCheckpointProcessGetState",
)

# An operation on a multi-GB process takes seconds to minutes (1.8 GB/s measured); a hung
# cuda-checkpoint must still not hang llmuxd forever.
DEFAULT_OP_TIMEOUT = 900.0
DEFAULT_LOCK_TIMEOUT_MS = 30_000


class CudaError(Exception):
    """A CUDA suspend/resume step failed.  ``message`` carries the driver's (or the utility's) words."""

    def __init__(self, message: str, *, code: int | None = None, pid: int | None = None, op: str | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.pid = pid
        self.op = op




# ---------------------------------------------------------------------------------------------
# Backend 1: the CUDA driver API through ctypes
# ---------------------------------------------------------------------------------------------
class _CUcheckpointLockArgs(ctypes.Structure):
    """``CUcheckpointLockArgs``: ``{unsigned int timeoutMs; unsigned int reserved0; cuuint64_t reserved1[7];}``
    (timeoutMs 0 = no timeout; reserved fields must be zero: ctypes zero-fills)."""

    _fields_ = [("timeoutMs", ctypes.c_uint), ("reserved0", ctypes.c_uint), ("reserved1", ctypes.c_uint64 * 7)]


class DriverBackend:
    """``cuCheckpointProcess*`` from ``libcuda.so.1``.  Construction loads the library and checks
    the symbols (raises ``OSError``/``AttributeError``); :meth:`init` runs ``cuInit(0)`` once."""

    kind = "driver"

    def __init__(self, library: str = LIBCUDA):
        self.library = library
        lib = ctypes.CDLL(library)
        c_int, c_uint = ctypes.c_int, ctypes.c_uint
        lib.cuInit.argtypes = [c_uint]
        lib.cuInit.restype = c_int
        lib.cuDriverGetVersion.argtypes = [ctypes.POINTER(c_int)]
        lib.cuDriverGetVersion.restype = c_int
        for name in ("cuGetErrorString", "cuGetErrorName"):
            fn = getattr(lib, name)
            fn.argtypes = [c_int, ctypes.POINTER(ctypes.c_char_p)]
            fn.restype = c_int
        missing = [s for s in CHECKPOINT_SYMBOLS if not hasattr(lib, s)]
        if missing:
            raise AttributeError(f"{library} has no {', '.join(missing)} (CUDA checkpoint needs driver >= 570)")
        # CUresult cuCheckpointProcessLock(int pid, CUcheckpointLockArgs *args)
        lib.cuCheckpointProcessLock.argtypes = [c_int, ctypes.POINTER(_CUcheckpointLockArgs)]
        # CUresult cuCheckpointProcess{Checkpoint,Restore,Unlock}(int pid, CU...Args *args): args NULL
        for name in ("cuCheckpointProcessCheckpoint", "cuCheckpointProcessRestore", "cuCheckpointProcessUnlock"):
            getattr(lib, name).argtypes = [c_int, ctypes.c_void_p]
        # CUresult cuCheckpointProcessGetState(int pid, CUprocessState *state): an enum, int-sized
        lib.cuCheckpointProcessGetState.argtypes = [c_int, ctypes.POINTER(c_int)]
        for name in CHECKPOINT_SYMBOLS:
            getattr(lib, name).restype = c_int
        self._lib = lib
        self._init_lock = threading.Lock()
        self._initialised = False

    def driver_version(self) -> str | None:
        v = ctypes.c_int(0)
        if self._lib.cuDriverGetVersion(ctypes.byref(v)) != CUDA_SUCCESS or v.value <= 0:
            return None
        return f"{v.value // 1000}.{v.value % 1000 // 10}"

    def error_text(self, code: int) -> str:
        name, text = ctypes.c_char_p(), ctypes.c_char_p()
        if self._lib.cuGetErrorName(code, ctypes.byref(name)) != CUDA_SUCCESS or not name.value:
            name = None
        if self._lib.cuGetErrorString(code, ctypes.byref(text)) != CUDA_SUCCESS or not text.value:
            text = None
        label = name.value.decode() if name is not None else _CUDA_ERROR_NAMES.get(code, f"CUresult {code}")
        return f"{label}: {text.value.decode()}" if text is not None else label

    def _check(self, code: int, op: str, pid: int | None) -> None:
        if code != CUDA_SUCCESS:
            where = f"{op}({pid})" if pid is not None else op
            raise CudaError(f"{where} failed: {self.error_text(code)}", code=code, pid=pid, op=op)

    def init(self) -> None:
        with self._init_lock:
            if not self._initialised:
                self._check(self._lib.cuInit(0), "cuInit", None)
                self._initialised = True

    def lock(self, pid: int, timeout_ms: int | None = None) -> None:
        self.init()
        args = None
        if timeout_ms:
            args = ctypes.pointer(_CUcheckpointLockArgs(timeoutMs=int(timeout_ms)))
        self._check(self._lib.cuCheckpointProcessLock(pid, args), "cuCheckpointProcessLock", pid)

    def checkpoint(self, pid: int) -> None:
        self.init()
        self._check(self._lib.cuCheckpointProcessCheckpoint(pid, None), "cuCheckpointProcessCheckpoint", pid)

    def restore(self, pid: int) -> None:
        self.init()
        self._check(self._lib.cuCheckpointProcessRestore(pid, None), "cuCheckpointProcessRestore", pid)

    def unlock(self, pid: int) -> None:
        self.init()
        self._check(self._lib.cuCheckpointProcessUnlock(pid, None), "cuCheckpointProcessUnlock", pid)

    def state(self, pid: int) -> str:
        self.init()
        st = ctypes.c_int(-1)
        code = self._lib.cuCheckpointProcessGetState(pid, ctypes.byref(st))
        if code == CUDA_ERROR_NOT_INITIALIZED:  # measured: a process without CUDA state
            return NO_CUDA
        self._check(code, "cuCheckpointProcessGetState", pid)
        return PROCESS_STATES.get(st.value, f"unknown({st.value})")

    def describe(self) -> str:
        v = self.driver_version()
        return f"CUDA driver API ({self.library}{f', CUDA {v}' if v else ''})"


# ---------------------------------------------------------------------------------------------
# Backend 2: NVIDIA's cuda-checkpoint utility
# ---------------------------------------------------------------------------------------------
def parse_help(text: str) -> dict[str, bool] | None:
    """What a ``cuda-checkpoint --help`` output offers: ``{"toggle", "get_state", "action"}``, or
    None when it is not cuda-checkpoint's help (e.g. a loader error)."""
    flags = {"toggle": "--toggle" in text, "get_state": "--get-state" in text, "action": "--action" in text}
    if not (flags["toggle"] or flags["action"]):
        return None
    if flags["action"]:  # the 570+ help lists the actions it accepts
        flags["action"] = all(a in text for a in ("lock", "checkpoint", "restore", "unlock"))
    return flags


def parse_state(text: str) -> str:
    """A ``cuda-checkpoint --get-state`` output (``running``, ``locked``, ``checkpointed``,
    ``failed``...) as one of :data:`PROCESS_STATES`'s words, :data:`NO_CUDA`, or ``unknown``."""
    low = text.strip().lower()
    # The driver's CUDA_ERROR_NOT_INITIALIZED: the process has no CUDA state.  cuda-checkpoint
    # 580 says: Error getting process state for process ID N: "initialization error"
    if "not_initialized" in low or "not initialized" in low or "initialization error" in low:
        return NO_CUDA
    words = re.findall(r"[a-z_]+", low)
    for w in words:
        if w in PROCESS_STATES.values():
            return w
    return "unknown"


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


class BinaryBackend:
    """NVIDIA's ``cuda-checkpoint``.  Construction resolves the path and runs ``--help`` (raises
    ``FileNotFoundError`` / ``RuntimeError`` with the reason when it does not run)."""

    kind = "binary"

    def __init__(self, path: str = "cuda-checkpoint", op_timeout: float = DEFAULT_OP_TIMEOUT):
        resolved = path if "/" in path else shutil.which(path)
        if not resolved or not os.path.isfile(resolved):
            raise FileNotFoundError(f"{path} not found" + ("" if "/" in path else " on PATH"))
        if not os.access(resolved, os.X_OK):
            raise PermissionError(f"{resolved} is not executable")
        self.path = resolved
        self.op_timeout = op_timeout
        try:
            r = subprocess.run([resolved, "--help"], capture_output=True, text=True, timeout=15)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise RuntimeError(f"{resolved} --help did not run: {e}") from None
        flags = parse_help(r.stdout + r.stderr)
        if flags is None:
            why = _last_line(r.stderr) or _last_line(r.stdout) or f"exit status {r.returncode}"
            raise RuntimeError(f"{resolved} does not run here: {why}")
        self.has_actions = flags["action"]
        self.has_get_state = flags["get_state"]

    def _run(self, args: list[str], op: str, pid: int, timeout: float | None = None) -> str:
        argv = [self.path, *args]
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout or self.op_timeout)
        except subprocess.TimeoutExpired:
            raise CudaError(f"{' '.join(argv)} did not finish in {timeout or self.op_timeout:g} s",
                            pid=pid, op=op) from None
        except OSError as e:
            raise CudaError(f"cannot run {self.path}: {e.strerror}", pid=pid, op=op) from None
        if r.returncode != 0:
            why = _last_line(r.stderr) or _last_line(r.stdout) or "no message"
            raise CudaError(f"{' '.join(argv[1:])} failed (exit status {r.returncode}): {why}",
                            code=r.returncode, pid=pid, op=op)
        return r.stdout

    def state(self, pid: int) -> str:
        if not self.has_get_state:
            raise CudaError(f"{self.path} has no --get-state", pid=pid, op="get-state")
        try:
            out = self._run(["--get-state", "--pid", str(pid)], "get-state", pid, timeout=60)
        except CudaError as e:
            if parse_state(e.message) == NO_CUDA:
                return NO_CUDA
            raise
        return parse_state(out)

    def _action(self, action: str, pid: int, extra: list[str] = ()) -> None:
        self._run(["--action", action, "--pid", str(pid), *extra], action, pid)

    def _toggle(self, pid: int, expect: str, op: str) -> None:
        """Old utilities only toggle: refuse to toggle the wrong way round."""
        st = self.state(pid) if self.has_get_state else expect
        if st != expect:
            raise CudaError(f"{op}({pid}): process is {st}, expected {expect} (this cuda-checkpoint "
                            "only has --toggle)", pid=pid, op=op)
        self._run(["--toggle", "--pid", str(pid)], op, pid)

    # Without --action, lock+checkpoint is one toggle (and restore+unlock another): lock and
    # unlock then only check the state; there is no tree-wide lock before the first checkpoint.
    def lock(self, pid: int, timeout_ms: int | None = None) -> None:
        if self.has_actions:
            self._action("lock", pid, ["--timeout", str(int(timeout_ms))] if timeout_ms else [])
        elif self.has_get_state and (st := self.state(pid)) != "running":
            raise CudaError(f"lock({pid}): process is {st}, expected running", pid=pid, op="lock")

    def checkpoint(self, pid: int) -> None:
        if self.has_actions:
            self._action("checkpoint", pid)
        else:
            self._toggle(pid, "running", "checkpoint")

    def restore(self, pid: int) -> None:
        if self.has_actions:
            self._action("restore", pid)
        else:
            self._toggle(pid, "checkpointed", "restore")

    def unlock(self, pid: int) -> None:
        if self.has_actions:
            self._action("unlock", pid)

    def describe(self) -> str:
        mode = "--action lock|checkpoint|restore|unlock" if self.has_actions else "--toggle only"
        return f"cuda-checkpoint utility ({self.path}, {mode})"


def short_oserror(e: OSError) -> str:
    """An OSError of loading a library, in few words."""
    text = str(e)
    return "not installed" if "cannot open shared object file" in text else text
