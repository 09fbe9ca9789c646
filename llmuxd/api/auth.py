"""Who may do what over HTTP.

* ``/control/*``: loopback peers (127.0.0.0/8, ::1) without credentials — local root can
  drive llmuxd anyway; anyone else only with ``Authorization: Bearer <control token>``.  When
  a token is configured, a presented one must be right, from loopback too (401 otherwise).  A
  request carrying proxy headers (Forwarded, X-Forwarded-For, X-Real-IP) came through a proxy
  and gets no loopback trust.  Nor does a request that changes something (not GET or HEAD) sent
  by a web browser (it carries ``Origin`` or ``Sec-Fetch-Site``): a page from anywhere, opened
  in a browser on this machine, must not wake or sleep models through it (the status page's
  buttons send the token).
* The OpenAI routes (``/v1/*``): open, or, with ``api_keys`` configured, ``Authorization:
  Bearer <one of them>``.

The control token comes from the systemd credential ``control-token``, ``$LLMUXD_CONTROL_TOKEN``
or the config's ``control_token`` (first found), read once at start and never logged.
Secrets are compared as SHA-256 digests with ``hmac.compare_digest``: constant time, no length.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
from pathlib import Path

from aiohttp import web

from ..config import Config, ConfigError
from ..errors import Forbidden, Unauthorized

log = logging.getLogger(__name__)

TOKEN_ENV = "LLMUXD_CONTROL_TOKEN"
CREDENTIAL = "control-token"
MIN_TOKEN_CHARS = 16
_PROXY_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP")
_BROWSER_HEADERS = ("Origin", "Sec-Fetch-Site")


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()


def resolve_control_token(config: Config) -> tuple[str | None, str]:
    """``(token, where it came from)``.  The environment variable is removed from this process's
    environment once read, so no backend (nor its checkpoint) inherits it."""
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    env = os.environ.pop(TOKEN_ENV, None)
    candidates = []
    if creds and (Path(creds) / CREDENTIAL).is_file():
        path = Path(creds) / CREDENTIAL
        try:
            candidates.append((path.read_text().strip(), f"systemd credential {CREDENTIAL}"))
        except OSError as e:
            raise ConfigError(path, [f"cannot read the control token: {e.strerror}"]) from None
    if env is not None:
        candidates.append((env.strip(), f"${TOKEN_ENV}"))
    if config.control_token:
        candidates.append((config.control_token, "config control_token"))
    if not candidates:
        return None, "none"
    token, source = candidates[0]
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(source, [f"the control token must have at least {MIN_TOKEN_CHARS} characters"])
    return token, source


def _bearer(request: web.Request) -> str | None:
    """The bearer credential presented, "" when Authorization is not a bearer token, None when
    there is no Authorization header at all."""
    value = request.headers.get("Authorization")
    if value is None:
        return None
    scheme, _, credential = value.strip().partition(" ")
    return credential.strip() if scheme.lower() == "bearer" else ""


def _loopback_peer(request: web.Request) -> bool:
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    if not peer or not isinstance(peer, tuple):
        return False  # a unix socket is not served; unknown is not loopback
    try:
        addr = ipaddress.ip_address(peer[0].split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def _loopback_trusted(request: web.Request, changes: bool) -> bool:
    if not _loopback_peer(request) or any(h in request.headers for h in _PROXY_HEADERS):
        return False
    return not changes or not any(h in request.headers for h in _BROWSER_HEADERS)


class Access:
    def __init__(self, control_token: str | None, api_keys: list[str]):
        self._token = _digest(control_token) if control_token else None
        self._keys = [_digest(k) for k in api_keys]

    @classmethod
    def from_config(cls, config: Config) -> "Access":
        token, source = resolve_control_token(config)
        log.info("control API: loopback peers%s; OpenAI routes: %s",
                 f", and others presenting the control token (from {source})" if token else " only",
                 f"{len(config.api_keys)} API key(s) required" if config.api_keys else "open")
        return cls(token, config.api_keys)

    @property
    def api_keys_required(self) -> bool:
        return bool(self._keys)

    def check_control(self, request: web.Request) -> None:
        if not self._control_allowed(request, changes=request.method not in ("GET", "HEAD")):
            raise Forbidden("the control API is served to loopback peers only (and changes, from a web "
                            "browser, never without the token), or with 'Authorization: Bearer <control token>'")

    def may_control(self, request: web.Request) -> bool:
        """Whether a request with these credentials, from this peer, may use the control verbs
        (wake, sleep): what the status page asks before it offers its buttons."""
        return self._control_allowed(request, changes=True)

    def _control_allowed(self, request: web.Request, changes: bool) -> bool:
        presented = _bearer(request) if self._token is not None else None
        if presented is not None:
            if not hmac.compare_digest(_digest(presented), self._token):
                raise Unauthorized("invalid control token")
            return True
        return _loopback_trusted(request, changes)

    def check_api(self, request: web.Request) -> None:
        if not self._keys:
            return
        presented = _bearer(request)
        if not presented:
            raise Unauthorized("You didn't provide an API key. Provide it as 'Authorization: Bearer <key>'.")
        digest = _digest(presented)
        ok = False
        for key in self._keys:  # no early exit: the time taken does not say which key matched
            ok |= hmac.compare_digest(digest, key)
        if not ok:
            raise Unauthorized("Incorrect API key provided.")
