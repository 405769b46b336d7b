"""Dashboard authentication (a server-side login session behind a cookie) and the same-origin check of
its POSTs.

Logging in with an API key starts a session (``app.auth.start_dashboard_session``): the cookie holds a
random session id, never the key, and the database only its hash. Each request looks the session up
(unknown, expired, logged out or its key revoked: back to the login page) and takes the key's
per-key rate limit. Logout deletes the session, so a copied cookie stops working at once. The cookie
is HttpOnly (no script can read it), SameSite=Strict (no other site's page can make the browser send
it), Secure over https, and has no Max-Age, so it ends with the browser session; the server-side
session ends after ``IPO_DASHBOARD_SESSION_SECONDS`` in any case. State-changing POSTs also require an
``Origin`` (or, failing that, ``Referer``) naming this host: SameSite alone does not cover older
browsers or a sibling subdomain's page.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import parse_qsl, urlsplit

from fastapi import Cookie, Depends, Request, Response

from app.auth import KEY_PREFIX, Caller, authenticate, dashboard_caller
from app.deps import Ctx, DbSession
from app.errors import Forbidden, InvalidRequest, PayloadTooLarge, Unauthorized

SESSION_COOKIE = "ipo_session"
MAX_FORM_BYTES = 8 * 1024
"""Dashboard forms carry an API key at most (the body limit middleware's general limit is larger)."""

SessionCookie = Annotated[str | None, Cookie(alias=SESSION_COOKIE)]


class LoginRequired(Exception):
    """No session cookie, or its key no longer authenticates: the browser is sent to the login page."""


def set_session_cookie(response: Response, request: Request, session_id: str) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        session_id,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )


def clear_session_cookie(response: Response) -> None:
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")


def check_key(ctx: Ctx, session: DbSession, api_key: str) -> Caller:
    """The caller owning ``api_key`` (the API's own lookup and per-key rate limit); ``Unauthorized``
    with a message meant for the login page."""
    if not api_key.startswith(KEY_PREFIX):
        raise Unauthorized(f"That is not an API key: keys start with '{KEY_PREFIX}'.")
    caller = authenticate(session, f"Bearer {api_key}")
    ctx.rate_limiter.check(caller.key_id)
    return caller


def get_dashboard_caller(ctx: Ctx, session: DbSession, session_id: SessionCookie = None) -> Caller:
    if not session_id:
        raise LoginRequired
    try:
        caller = dashboard_caller(session, session_id)
    except Unauthorized as exc:  # logged out, expired, key revoked since login, or a forged cookie
        raise LoginRequired from exc
    ctx.rate_limiter.check(caller.key_id)
    return caller


DashboardCaller = Annotated[Caller, Depends(get_dashboard_caller)]


def require_same_origin(request: Request) -> None:
    """Refuse a POST whose ``Origin`` (or ``Referer`` when a browser sent no ``Origin``) is another site."""
    origin = request.headers.get("origin")
    source = origin if origin is not None else request.headers.get("referer")
    if not source or source == "null":
        raise Forbidden("This form must be sent from the dashboard's own pages (no Origin or Referer).")
    parts = urlsplit(source)
    host = request.headers.get("host", "")
    scheme_ok = parts.scheme == "https" or (parts.scheme == "http" and request.url.scheme == "http")
    if not (scheme_ok and host and parts.netloc.lower() == host.lower()):
        raise Forbidden("This form must be sent from the dashboard's own pages (cross-site request refused).")


SameOrigin = Depends(require_same_origin)


async def read_form(request: Request) -> dict[str, str]:
    """A small urlencoded form, read with a size limit (first value of each field)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in ("", "application/x-www-form-urlencoded"):
        raise InvalidRequest("Expected an HTML form (application/x-www-form-urlencoded).")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise PayloadTooLarge("Form too large.")
    fields: dict[str, str] = {}
    for key, value in parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True):
        fields.setdefault(key, value)
    return fields


FormFields = Annotated[dict[str, str], Depends(read_form)]
