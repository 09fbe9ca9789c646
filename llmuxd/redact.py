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


# In free text (a model's output): ``--api-key VALUE``, ``api_key='VALUE'``, ``"hf_token": ["VALUE"]``,
# ``HF_TOKEN=VALUE``, ``Bearer VALUE``, and token shapes that announce themselves (``hf_...``).
# The name must end in the secret word: ``max_tokens=16`` and ``tokenizer: ORG/NAME`` stay.
_WORDS = r"(?:api[-_]?key|token|secret|password|passwd|credentials?)"
_TEXT_SECRET = re.compile(
    r"(?P<keep>(?:--[\w-]*" + _WORDS + r"\s+|(?:--?|\b)[\w-]*" + _WORDS + r"""["']?\s*[:=]\s*)[\[(]?\s*[bru]?["']?)"""
    r"""(?P<value>[^\s"',\])}]+)"""
    r"""|(?P<bearer>\b[Bb]earer\s+)[^\s"',]+"""
    r"""|\b(?:hf|sk|ghp|gho|xox[abp])[-_][A-Za-z0-9_-]{16,}""",
    re.I,
)


def text(line: str, secrets: Iterable[str] = ()) -> str:
    """``line`` with every known secret (at least 6 characters) and every secret-looking value
    replaced by ``<redacted>``."""
    for s in secrets:
        if len(s) >= 6 and s in line:
            line = line.replace(s, REDACTED)

    def hide(m: re.Match) -> str:
        if m.group("keep") is not None:
            return m.group("keep") + REDACTED
        if m.group("bearer") is not None:
            return m.group("bearer") + REDACTED
        return REDACTED

    return _TEXT_SECRET.sub(hide, line)
