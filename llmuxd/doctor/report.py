"""The doctor's report: one :class:`Check` per item (``OK`` / ``WARN`` / ``NO``, the reason and
the fix), the exit status the checks give, and their rendering as text."""

from __future__ import annotations

from dataclasses import dataclass

OK, WARN, NO = "OK", "WARN", "NO"


@dataclass
class Check:
    section: str
    item: str
    status: str  # OK / WARN / NO
    detail: str
    fix: str = ""
    required: bool = False  # a NO here means llmuxd cannot run this configuration


def exit_code(checks: list[Check]) -> int:
    return 1 if any(c.required and c.status == NO for c in checks) else 0


def render(checks: list[Check], config_path: str | None = None) -> str:
    lines = [f"llmuxd doctor{f' (config {config_path})' if config_path else ''}"]
    section = None
    width = max((len(c.item) for c in checks), default=10)
    for c in checks:
        if c.section != section:
            section = c.section
            lines.append(f"{section}:")
        line = f"  {c.status:<4}  {c.item:<{width}}  {c.detail}"
        if c.fix and c.status != OK:
            line += f"  -> {c.fix}"
        lines.append(line)
    failed = [c for c in checks if c.required and c.status == NO]
    if failed:
        lines.append(f"NOT READY: {len(failed)} thing(s) this configuration needs are missing: "
                     + ", ".join(f"{c.section} {c.item}" for c in failed))
    else:
        warns = sum(c.status == WARN for c in checks)
        lines.append("READY: llmuxd can run this configuration here"
                     + (f" ({warns} warning(s): parts that are off or degraded)" if warns else ""))
    return "\n".join(lines)
