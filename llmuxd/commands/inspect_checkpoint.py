"""``llmuxd inspect-checkpoint PATH``: a checkpoint's manifest in human form — what it needs,
what it saved, what this container lacks — and whether it is restorable here."""

from __future__ import annotations

import stat
from pathlib import Path

from pydantic import BaseModel

from ..checkpoint import safefs
from ..checkpoint.model import Manifest
from ..checkpoint.prepare import check
from ..checkpoint.store import Settings, inspect
from ..checkpoint.trust import normalized
from . import CommandError


class CheckpointReport(BaseModel):
    """What ``inspect-checkpoint`` finds (``--json`` prints it)."""

    path: str
    manifest: Manifest
    not_in_place: list[str]  # saved files this container lacks (prepare-restore puts them back)
    problems: list[str]  # why it cannot be restored here
    restorable: bool


def _fmt_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def inspect_checkpoint(path: Path, verify_images: bool = False, key_file: Path | None = None) -> CheckpointReport:
    """The manifest, what this container lacks, and whether it is restorable here.  The folder
    must pass the same trust rule as for a restore (the sticky-directory exception applies above
    PATH itself)."""
    path = normalized(path)
    found = inspect(None, path, Settings(images_dir=path, key_file=key_file))
    if found.state == "none":
        raise CommandError(f"{path}: not a checkpoint (no such folder)")
    if found.state != "valid" or found.manifest is None:
        raise CommandError(f"{path}: not a usable checkpoint ({found.reason}): {found.detail}")
    missing = []
    for r in found.manifest.blobs():
        st = safefs.lstat(r.path)
        if st is None or (st.st_size, stat.S_IMODE(st.st_mode), st.st_mtime_ns) != (r.size, r.mode & 0o777, r.mtime_ns):
            missing.append(r.path)
    problems = check(found, images=verify_images)
    return CheckpointReport(path=str(path), manifest=found.manifest, not_in_place=missing, problems=problems,
                            restorable=not problems)


def render(report: CheckpointReport) -> str:
    m = report.manifest
    procs = m.needs.processes
    by_origin: dict[str, int] = {}
    for v in m.verify:
        by_origin[v.origin] = by_origin.get(v.origin, 0) + 1
    lines = [
        f"checkpoint {report.path}",
        f"  model {m.model} ({m.served_name}), eviction {m.eviction}, made {m.created} on kernel {m.host.kernel}",
        f"  images: {len(m.images)} files, {_fmt_size(sum(r.size for r in m.images.values()))}; timings: {m.timings}",
        f"  processes: {len(procs)} ({', '.join(sorted({p.comm or '?' for p in procs}))}); "
        f"own PID namespace: {m.own_pidns or m.pidns}; {len(m.pids)} PIDs/TIDs",
        f"  listening: {', '.join(f'{x.addr}:{x.port}' for x in m.listen) or 'none'}",
        f"  canary: {m.canary!r}; CUDA state: {'yes' if m.cuda or m.cuda_pids else 'no'}",
        f"  saved (put back byte-exact): {len(m.saved)} files, {_fmt_size(sum(r.size for r in m.saved))}",
        *(f"    {r.path}  {_fmt_size(r.size)}  mode {r.mode:o}" for r in m.saved),
        *(f"    {r.path}  (CRIU link_remap file)" for r in m.link_remaps),
        f"  re-created empty (append-only logs): {len(m.recreate)}",
        *(f"    {r.path}" for r in m.recreate),
        f"  directories: {len(m.dirs)}; socket directories: {', '.join(m.socket_dirs) or 'none'}",
        f"  verified, not saved: {', '.join(f'{n} {k}' for k, n in sorted(by_origin.items()))}",
        f"in this container: {len(report.not_in_place)} saved file(s) not in place (prepare-restore puts them back)",
        *(f"  PROBLEM: {p}" for p in report.problems),
        "  restorable here" if report.restorable else f"  NOT restorable here: {len(report.problems)} problem(s)",
    ]
    return "\n".join(lines)
