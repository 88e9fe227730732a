"""Response headers every answer carries, and the CSRF check of the one POST (replay).

CSRF: a browser re-sends HTTP Basic credentials to this origin by itself, even on a form
another site posts, so a replay POST must also carry a token that only a page of this
console could have read. The token is ``<nonce>.<HMAC(secret, role|nonce)>``: bound to the
logged-in role and to a secret of this process. The confirm page sets it as a cookie
(HttpOnly, SameSite=Strict) and as a hidden form field; the POST must send both, equal, valid
for its role (double submit, signed), and an ``Origin`` (or, without one, a ``Referer``) of
this console's own origin.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

CSRF_COOKIE = "stampflow_csrf"
CSRF_FIELD = "csrf"

HEADERS = {
    # No inline script or style anywhere: the JS and CSS are files served from /static.
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    # same-origin: our own POSTs keep their Origin and Referer; other sites learn nothing.
    "referrer-policy": "same-origin",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
}


class SecureHeaders:
    """ASGI middleware: :data:`HEADERS` on every response (pages, API, images, errors)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", [])
                           if k.decode("latin-1").lower() not in HEADERS]
                headers += [(k.encode(), v.encode()) for k, v in HEADERS.items()]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


class CsrfTokens:
    def __init__(self, secret: bytes | None = None) -> None:
        self._secret = secret or secrets.token_bytes(32)

    def _mac(self, role: str, nonce: str) -> str:
        return hmac.new(self._secret, f"{role}|{nonce}".encode(), hashlib.sha256).hexdigest()

    def issue(self, role: str) -> str:
        nonce = secrets.token_urlsafe(18)
        return f"{nonce}.{self._mac(role, nonce)}"

    def problem(self, role: str, cookie: str | None, field: str | None) -> str | None:
        """None when the pair is valid for ``role``, else why not (one line)."""
        if not cookie or not field:
            return "the CSRF token is missing: open the confirm page again"
        if not hmac.compare_digest(cookie, field):
            return "the CSRF token does not match its cookie"
        nonce, _, mac = field.partition(".")
        if not nonce or not hmac.compare_digest(mac, self._mac(role, nonce)):
            return "the CSRF token is not valid for this role"
        return None


def origin_problem(origin: str | None, referer: str | None, scheme: str,
                   host: str | None) -> str | None:
    """None when the request comes from a page of this console's own origin."""
    if not host:
        return "no Host header"
    own = f"{scheme}://{host}".lower()
    if origin:
        return None if origin.lower() == own else f"Origin {origin[:100]} is not {own}"
    if referer:
        parts = urlsplit(referer)
        seen = f"{parts.scheme}://{parts.netloc}".lower()
        return None if seen == own else f"Referer from {seen[:100]} is not {own}"
    return "neither Origin nor Referer: a replay is accepted only from the console's own page"
