"""Small helpers of the fact gatherers: run a program, read a file, find an executable, parse
and print a version, pick the telling line of a tool's output."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path


def run(argv: list[str], timeout: float = 30) -> tuple[int | None, str]:
    """(exit status, stdout+stderr); (None, reason) when it could not run."""
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return None, f"no answer in {timeout:g} s"
    except OSError as e:
        return None, e.strerror or str(e)
    return r.returncode, (r.stdout + r.stderr)


def read(path: str | Path) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def parse_version(text: str) -> tuple[int, ...] | None:
    """``Version: 4.2.1`` (criu --version) or ``6.18.44-fc`` (a kernel release) -> (4, 2, 1)."""
    m = re.search(r"(?:Version:\s*)?(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    if not m:
        return None
    return tuple(int(x) for x in m.groups() if x is not None)


def vstr(v: tuple[int, ...] | None) -> str:
    return ".".join(map(str, v)) if v else "?"


def first_problem_line(output: str) -> str:
    """The first line of ``criu check`` output that says what is wrong."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for ln in lines:
        if re.search(r"\b(Error|error|fail|FAIL|not supported|unsupported|must be)", ln):
            return ln
    return lines[0] if lines else "no output"


def resolve(path: str, fallbacks: tuple[str, ...] = ()) -> str | None:
    if "/" in path:
        return path if os.path.isfile(path) else None
    found = shutil.which(path)
    if found:
        return found
    for fb in fallbacks:
        if os.path.isfile(fb) and os.access(fb, os.X_OK):
            return fb
    return None
