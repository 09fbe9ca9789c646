"""The status page: ``/ui`` (one HTML, one script, one style sheet, packaged here) on the
control listener.  The files hold no data and are served to whoever reaches the listener; the
data comes from the control API the page polls, under its rules (``auth.py``): a loopback peer
sees it read-only, anyone else needs the control token, and the wake/sleep buttons only appear
for a token the daemon accepted (``/control/access``).

Every answer of the page carries a strict Content-Security-Policy (nothing but this origin's
files: no inline script or style, no framing), and the script writes data only as text."""

from __future__ import annotations

from importlib import resources

from aiohttp import web

from ..auth import Access

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "no-cache",
}
_FILES = {  # URL path -> (packaged file, content type)
    "/ui": ("index.html", "text/html; charset=utf-8"),
    "/ui/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/ui/app.css": ("app.css", "text/css; charset=utf-8"),
}


def _static(name: str, content_type: str):
    body = resources.files(__name__).joinpath(name).read_bytes()

    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=body, headers={**SECURITY_HEADERS, "Content-Type": content_type})

    return serve


def page_routes() -> list[web.RouteDef]:
    """The page's own files: open, like /health (they say nothing about the daemon)."""
    return [web.get(path, _static(name, ctype)) for path, (name, ctype) in _FILES.items()]


def access_routes(access: Access) -> list[web.RouteDef]:
    """``GET /control/access``: whether the caller, as it asked (its token, its peer), may use
    the control verbs; mounted with the control API's own check."""

    async def may(request: web.Request) -> web.Response:
        return web.json_response({"control": access.may_control(request)}, headers=SECURITY_HEADERS)

    return [web.get("/control/access", may)]
