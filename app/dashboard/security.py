"""Dashboard authentication (the API key in a session cookie) and the same-origin check of its POSTs.

The cookie holds the raw key and is checked on every request with the API's own ``get_caller`` (so the
same hashing, revocation and per-key rate limit apply). It is HttpOnly (no script can read it),
SameSite=Strict (no other site's page can make the browser send it), Secure over https, and has no
Max-Age, so it ends with the browser session. State-changing POSTs also require an ``Origin`` (or,
failing that, ``Referer``) naming this host: SameSite alone does not cover older browsers or a
sibling subdomain's page.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import parse_qsl, urlsplit

from fastapi import Cookie, Depends, Request, Response

from app.auth import KEY_PREFIX, Caller
from app.deps import Ctx, DbSession, get_caller
from app.errors import Forbidden, InvalidRequest, PayloadTooLarge, Unauthorized

SESSION_COOKIE = "ipo_session"
MAX_FORM_BYTES = 8 * 1024
"""Dashboard forms carry an API key at most; the body limit middleware only covers ``/v1``."""


class LoginRequired(Exception):
    """No session cookie, or its key no longer authenticates: the browser is sent to the login page."""


def set_session_cookie(response: Response, request: Request, api_key: str) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        api_key,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )


def clear_session_cookie(response: Response) -> None:
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")


def check_key(ctx: Ctx, session: DbSession, api_key: str) -> Caller:
    """The caller owning ``api_key``; ``Unauthorized`` with a message meant for the login page."""
    if not api_key.startswith(KEY_PREFIX):
        raise Unauthorized(f"That is not an API key: keys start with '{KEY_PREFIX}'.")
    return get_caller(ctx, session, authorization=f"Bearer {api_key}")


def get_dashboard_caller(ctx: Ctx, session: DbSession, ipo_session: Annotated[str | None, Cookie()] = None) -> Caller:
    if not ipo_session:
        raise LoginRequired
    try:
        return check_key(ctx, session, ipo_session)
    except Unauthorized as exc:  # revoked since login, or a forged cookie
        raise LoginRequired from exc


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
