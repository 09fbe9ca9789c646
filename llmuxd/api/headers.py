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


def _connection_named(headers) -> set[str]:
    named: set[str] = set()
    for value in headers.getall("Connection", ()):
        named.update(t.strip().lower() for t in value.split(",") if t.strip())
    return named


def _filtered(headers, drop: frozenset[str]) -> CIMultiDict[str]:
    drop = drop | _connection_named(headers)
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in drop)


def to_backend(headers, *, strip_authorization: bool) -> CIMultiDict[str]:
    """A client's request headers as sent on to a backend.  ``strip_authorization``: the
    Authorization header carries llmuxd's own API key, which is not the backend's business."""
    drop = HOP_BY_HOP | _FRAMING | _REQUEST_ONLY
    return _filtered(headers, drop | {"authorization"} if strip_authorization else drop)


def to_client(headers) -> CIMultiDict[str]:
    """A backend's response headers as relayed to the client."""
    return _filtered(headers, HOP_BY_HOP | _FRAMING)
