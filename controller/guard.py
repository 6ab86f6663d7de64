"""Who may drive the API: the bearer token, when one is set, and never a web page on another origin.

A token (`KVBUS_API_TOKEN`, or the yaml key `api_token`) makes every endpoint but `/healthz` and the
dashboard's page and static files answer 401 without `Authorization: Bearer <token>`; the comparison
takes the same time whatever the token sent. Without one the API stays as open as LMCache's, but two
rules keep browsers out of it all the same: a POST whose body is not `application/json` is a 415
(schemas.parse), and a POST that a browser sends from a page of another origin is a 403. A page can
send a text/plain POST, or a form, without asking first (no CORS preflight), and without these either
one reached /clear; a JSON body from another origin needs a preflight, which kvbus never grants.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from kvbus.controller.errors import CrossOrigin, Unauthorized, response

# Served to anyone: liveness probes, and the dashboard's page and assets (its data, /dashboard.json, is not).
PUBLIC = ("/healthz", "/")
PUBLIC_PREFIX = "/static/"
# Methods that change nothing: a browser reads no answer across origins without CORS, which kvbus never sends.
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
# What browsers put in Sec-Fetch-Site for a request a page of this very origin made, or a user typed.
_OWN_SITE = ("same-origin", "none")
_READS = {name.encode(): name for name in ("authorization", "sec-fetch-site", "origin", "host")}


class Guard:
    def __init__(self, app: ASGIApp, *, token: str | None) -> None:
        self.app = app
        self._token = None if token is None else token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self._refusal(scope)
            if refusal is not None:
                await response(refusal)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope) -> Unauthorized | CrossOrigin | None:
        path = scope["path"]
        token = None if path in PUBLIC or path.startswith(PUBLIC_PREFIX) else self._token
        if token is None and scope["method"] in SAFE_METHODS:
            return None
        headers = _read(scope["headers"])
        if token is not None:
            missing = _bearer(headers.get("authorization"))
            if missing is None:
                return Unauthorized(
                    "this controller requires its API token: send Authorization: Bearer <token>, the token "
                    "set by KVBUS_API_TOKEN or api_token"
                )
            if not hmac.compare_digest(missing, token):
                return Unauthorized("the bearer token sent is not this controller's API token")
        if scope["method"] not in SAFE_METHODS:
            reason = cross_origin(headers)
            if reason is not None:
                return CrossOrigin(
                    f"a browser request from another origin ({reason}) may not drive the API: "
                    "send it from a program, or from this controller's own page"
                )
        return None


def _read(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """The first value of each header the guard reads, in one pass over the request's headers (ASGI servers
    give their names in lower case): Starlette's Headers scans them all again for each one asked for."""
    found: dict[str, str] = {}
    for name, value in raw:
        key = _READS.get(name)
        if key is not None and key not in found:
            found[key] = value.decode("latin-1")
    return found


def _bearer(authorization: str | None) -> bytes | None:
    """The token of an `Authorization: Bearer <token>` header (the scheme in any case, RFC 7235), or None."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    return token.strip().encode() if scheme.lower() == "bearer" and token.strip() else None


def cross_origin(headers: Mapping[str, str]) -> str | None:
    """Why a request comes from a page of another origin, or None when nothing says it does.

    Programs (curl, LMCache's clients, httpx) send neither header. Browsers send Sec-Fetch-Site, and
    Origin with every POST; a page on another port of the same host is another origin too.
    """
    site = headers.get("sec-fetch-site")
    if site is not None and site.lower() not in _OWN_SITE:
        return f"Sec-Fetch-Site: {site}"
    origin = headers.get("origin")
    if origin is None:
        return None
    host = headers.get("host", "")
    if origin == "null" or urlsplit(origin).netloc.lower() != host.lower():
        return f"Origin {origin}, not this controller's {host or 'host'}"
    return None
