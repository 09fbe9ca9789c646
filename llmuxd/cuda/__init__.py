"""The GPU side of llmuxd: which processes hold CUDA state, suspending and resuming it from
outside them (:mod:`.suspend`, over the backends of :mod:`.backends`), and the GPUs' memory
(:mod:`.inventory`).  The names callers use are importable from here."""

from .backends import LIBCUDA, NO_CUDA, BinaryBackend, CudaError, DriverBackend, parse_help, parse_state, short_oserror
from .inventory import LIBNVML, check_restorable, gpu_bytes_of, gpu_inventory, gpu_memory_by_pid, parse_nvidia_smi
from .suspend import CudaCheckpointer, SuspendChoice, gpu_processes, resume_tree, select_checkpointer, suspend_tree

__all__ = ["LIBCUDA", "LIBNVML", "NO_CUDA", "BinaryBackend", "CudaCheckpointer", "CudaError", "DriverBackend", "SuspendChoice",
           "check_restorable", "gpu_bytes_of", "gpu_inventory", "gpu_memory_by_pid", "gpu_processes", "parse_help",
           "parse_nvidia_smi", "parse_state", "resume_tree", "select_checkpointer", "short_oserror", "suspend_tree"]
