"""Keeping secrets out of what others can read: manifests, logs, the journal, status, D-Bus.

A backend's argv may carry secrets (``--api-key KEY``, ``--hf-token=...``), and so may its
environment (``HF_TOKEN``, ``VLLM_API_KEY``).  Everything llmuxd records or shows about a
backend goes through :func:`argv` / :func:`environ` first, and each line of its own output that
llmuxd shows (a log tail) through :func:`text`.
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


def secret_variable(name: str) -> bool:
    return bool(_SECRET_ENV.search(name))


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
    return {k: (REDACTED if secret_variable(k) else v) for k, v in env.items()}


def command_line(args: Iterable[str]) -> str:
    return " ".join(argv(args))


# In free text (a model's own log lines): ``--opt VALUE`` / ``--opt=VALUE`` for a secret option,
# ``name=VALUE`` / ``name: VALUE`` / ``'name': 'VALUE'`` for a name that ends in a secret word
# (``api_key``, ``hf_token``, ``password``; not ``tokenizer`` or ``max_tokens``), and ``Bearer VALUE``.
_TEXT_OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)(=|\s+)([^\s'\",]+)")
_TEXT_ASSIGNED = re.compile(
    r"(?i)(?<![\w.-])([\w.-]*(?:api[-_]?key|token|secret|password|passwd|credentials?))(['\"]?\s*[:=]\s*['\"]?)"
    r"([^\s'\",;)}\]]+)")
_TEXT_BEARER = re.compile(r"(?i)\b(bearer\s+)([^\s'\",]+)")
#: Known secret values shorter than this are not searched for in text (too many false hits).
MIN_SECRET_CHARS = 8


def text(line: str, secrets: Iterable[str] = ()) -> str:
    """``line`` with every value of ``secrets`` (the ones llmuxd knows: API keys, a model's
    ``--api-key``, secret-named environment variables) and every secret-looking value replaced
    by ``<redacted>``."""
    for secret in secrets:
        if len(secret) >= MIN_SECRET_CHARS:
            line = line.replace(secret, REDACTED)
    line = _TEXT_OPTION.sub(lambda m: m.group(1) + m.group(2) + REDACTED if secret_option(m.group(1))
                            else m.group(0), line)
    line = _TEXT_ASSIGNED.sub(lambda m: m.group(1) + m.group(2) + REDACTED, line)
    return _TEXT_BEARER.sub(lambda m: m.group(1) + REDACTED, line)
