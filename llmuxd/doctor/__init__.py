"""``llmuxd doctor``: what this machine can and cannot do for llmuxd, in plain words.

One line per item, ``OK`` / ``WARN`` / ``NO``, with the reason and, where there is one, the fix.
The facts are gathered first (:func:`gather_facts`, which runs ``criu check``, loads libcuda and
NVML if present, tries a cgroup, asks the system bus), then judged against the configuration
(:func:`assess`, pure).  The exit status is 1 only when something the configuration needs is
missing (e.g. a model whose process eviction is ``checkpoint`` and no usable CRIU); a machine
without GPU, systemd or D-Bus still runs llmuxd, with those parts off, and exits 0.

Modules: :mod:`.report` (the checks, the exit status, the text), :mod:`.probe` (running
programs, reading files, versions), one per concern with its facts and their judgement —
:mod:`.kernel` (CRIU and the kernel), :mod:`.gpu` (GPUs and CUDA suspend), :mod:`.host`
(cgroups, systemd, D-Bus), :mod:`.configuration` (the config file, checkpoint folders) — and
:mod:`.run` (gather, judge, print).
"""

from .configuration import checkpoint_trust_facts, load_for_doctor
from .gpu import cuda_facts, describe_gpus
from .host import DBUS_POLICY, DBUS_POLICY_DIRS, cgroup_facts, dbus_facts, systemd_facts
from .kernel import CRIU_MIN, INSTALL_CRIU, criu_facts, criu_version_verdict, kernel_facts
from .probe import first_problem_line, parse_version
from .report import NO, OK, WARN, Check, exit_code, render
from .run import assess, doctor_facts, gather_facts, run_doctor

__all__ = [
    "CRIU_MIN", "DBUS_POLICY", "DBUS_POLICY_DIRS", "INSTALL_CRIU", "NO", "OK", "WARN", "Check", "assess",
    "cgroup_facts", "checkpoint_trust_facts", "criu_facts", "criu_version_verdict", "cuda_facts", "dbus_facts",
    "describe_gpus", "doctor_facts", "exit_code", "first_problem_line", "gather_facts", "kernel_facts",
    "load_for_doctor", "parse_version", "render", "run_doctor", "systemd_facts",
]
