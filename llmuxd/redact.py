"""Keeping secrets out of what others can read: manifests, logs, the journal, status, D-Bus.

A backend's argv may carry secrets (``--api-key KEY``, ``--hf-token=...``), and so may its
environment (``HF_TOKEN``, ``VLLM_API_KEY``).  Everything llmuxd records or shows about a
backend goes through :func:`argv` / :func:`environ` first.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

REDACTED = "<redacted>"

# Options whose value is a secret (``--opt VALUE`` or ``--opt=VALUE``).
_SECRET_OPTION = re.compile(r"^--?[\w-]*(api[-_]?key|token|secret|password|passwd|credential|auth)[\w-]*$", re.I)
# Environment variables whose value is a secret.
_SECRET_ENV = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH)", re.I)


def secret_option(name: str) -> bool:
    return bool(_SECRET_OPTION.match(name))


def argv(args: Iterable[str]) -> list[str]:
    """``args`` with the value of every secret-looking option replaced by ``<redacted>``."""
    out: list[str] = []
    hide_next = False
    for a in args:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
        elif a.startswith("-") and "=" in a and secret_option(a.split("=", 1)[0]):
            out.append(a.split("=", 1)[0] + "=" + REDACTED)
        else:
            out.append(a)
            hide_next = a.startswith("-") and secret_option(a)
    return out


def environ(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with the value of every secret-looking variable replaced by ``<redacted>``."""
    return {k: (REDACTED if _SECRET_ENV.search(k) else v) for k, v in env.items()}


def command_line(args: Iterable[str]) -> str:
    return " ".join(argv(args))
