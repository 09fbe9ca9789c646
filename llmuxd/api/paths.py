"""Request targets as the client sent them: only canonical paths are served or forwarded.

aiohttp normalizes the path it routes on (dot segments, percent-decoding); a backend may
normalize differently.  So the raw target is checked before anything else: a path that could
mean two things (dot segments, empty segments, backslashes, encoded slashes or other encoded
bytes beyond the unreserved set) is refused, and what is forwarded is the one canonical form.
"""

from __future__ import annotations

import functools
import re

from ..errors import BadRequest

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# RFC 3986 pchar, less ';' (path parameters, read as part of a dot segment by some servers).
_PCHAR_RAW = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,=:@]*")
_PCT = re.compile(r"%([0-9A-Fa-f]{2})")
_QUERY = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?]|%[0-9A-Fa-f]{2})*")


def _segment(raw: str) -> str:
    """One path segment, with encoded unreserved bytes decoded; BadRequest if not canonical."""

    def decode(m: re.Match) -> str:
        byte = int(m.group(1), 16)
        if byte not in _UNRESERVED:
            raise BadRequest(f"request path contains the encoded byte %{m.group(1)}, which is not allowed")
        return chr(byte)

    seg = _PCT.sub(decode, raw)
    if not _PCHAR_RAW.fullmatch(seg):
        raise BadRequest("request path contains a character that is not allowed")
    if seg == "":
        raise BadRequest("request path contains an empty segment")
    if seg in (".", ".."):
        raise BadRequest("request path contains a dot segment")
    return seg


@functools.lru_cache(maxsize=1024)  # checked twice per request (middleware, proxy), the same few targets
def canonical(raw_target: str) -> tuple[str, str]:
    """``(path, query)`` of a raw request target; BadRequest unless the path is canonical
    (a refusal is not cached: it raises)."""
    path, sep, query = raw_target.partition("?")
    if not path.startswith("/"):
        raise BadRequest("request target must be an absolute path")
    if sep and not _QUERY.fullmatch(query):
        raise BadRequest("request query contains a character that is not allowed")
    if path == "/":
        return path, query
    return "/" + "/".join(_segment(s) for s in path[1:].split("/")), query


@functools.lru_cache(maxsize=1024)
def forward_target(raw_target: str) -> str:
    """The target to send a backend: ``/v1/...`` in canonical form, with the query as sent."""
    path, query = canonical(raw_target)
    if not path.startswith("/v1/"):
        raise BadRequest("only /v1/ paths are forwarded")
    return path + ("?" + query if query else "")
