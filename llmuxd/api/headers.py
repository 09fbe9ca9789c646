"""Which headers cross the proxy: end-to-end ones only, both ways (RFC 9110 7.6.1)."""

from __future__ import annotations

from multidict import CIMultiDict

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
    "proxy-authorization", "proxy-authenticate",
})
# Set by the HTTP client for the bytes it actually sends.
_FRAMING = frozenset({"host", "content-length"})
# The request body is forwarded decoded (the server undid any Content-Encoding), and always
# whole: no 100-continue round trip upstream.
_REQUEST_ONLY = frozenset({"content-encoding", "expect"})

_TO_BACKEND = frozenset(n.encode() for n in HOP_BY_HOP | _FRAMING | _REQUEST_ONLY)
_TO_BACKEND_NO_AUTH = _TO_BACKEND | {b"authorization"}
_TO_CLIENT = HOP_BY_HOP | _FRAMING


def _named(values) -> set:
    """The header names a Connection header lists (lowercase)."""
    named = set()
    for value in values:
        named.update(t.strip().lower() for t in value.split(b"," if isinstance(value, bytes) else ",") if t.strip())
    return named


def to_backend(raw_headers, *, strip_authorization: bool) -> bytes:
    """A client's request header fields (aiohttp's ``raw_headers``: bytes as received, which
    its parser has checked) as sent on to a backend: ``Name: value\\r\\n`` each, in order.
    ``strip_authorization``: the Authorization header carries llmuxd's own API key, which is
    not the backend's business.  Host and Content-Length are the upstream client's."""
    drop = _TO_BACKEND_NO_AUTH if strip_authorization else _TO_BACKEND
    lines = []
    connection = None
    for name, value in raw_headers:
        lname = name.lower()
        if lname in drop:
            if lname == b"connection":
                connection = [value] if connection is None else [*connection, value]
            continue
        lines.append((lname, b"%s: %s\r\n" % (name, value)))
    if connection is not None:
        named = _named(connection)
        return b"".join(line for lname, line in lines if lname not in named)
    return b"".join([line for _, line in lines])


def to_client(headers: list[tuple[str, str]]) -> CIMultiDict[str]:
    """A backend's response headers (``(name, value)`` as received) as relayed to the client."""
    named = None
    for name, value in headers:
        if name.lower() == "connection":
            named = _named([value]) if named is None else named | _named([value])
    drop = _TO_CLIENT if named is None else _TO_CLIENT | named
    return CIMultiDict([(k, v) for k, v in headers if k.lower() not in drop])
