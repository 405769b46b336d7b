"""Templates, and the route class that makes every dashboard answer an HTML page with safe headers.

Services raise the same domain errors as for the API; here they become an HTML error page with the
same status (404 for another project's job, 409 for an illegal transition) instead of JSON, and a
missing or stale session sends the browser to the login page.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, RedirectResponse
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader

from app.dashboard.security import LoginRequired, clear_session_cookie
from app.errors import DomainError, RateLimited, loc_to_param

HERE = Path(__file__).resolve().parent
STATIC_DIR = HERE / "static"

SECURITY_HEADERS = {
    # No inline script anywhere: page data travels in data-* attributes. uPlot sizes its canvases
    # through element styles, hence 'unsafe-inline' for styles only.
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def format_time(unix: int | None) -> str:
    if not unix:
        return ""
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def format_value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)


_env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True, trim_blocks=True, lstrip_blocks=True)
_env.filters["time"] = format_time
_env.filters["value"] = format_value
templates = Jinja2Templates(env=_env)


def render(request: Request, name: str, context: dict[str, Any], status_code: int = 200) -> Response:
    return templates.TemplateResponse(request, name, context, status_code=status_code)


def error_page(request: Request, status: int, message: str) -> Response:
    titles = {400: "Bad request", 403: "Forbidden", 404: "Not found", 409: "Conflict", 429: "Too many requests"}
    context = {"status": status, "title": titles.get(status, "Error"), "message": message}
    return render(request, "error.html", context, status_code=status)


def _wants_html(request: Request) -> bool:
    return "text/html" in request.headers.get("accept", "")


class HtmlRoute(APIRoute):
    """Domain errors -> HTML error pages, no session -> the login page, security headers on everything."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                response = await handler(request)
            except LoginRequired:
                if _wants_html(request):
                    response = RedirectResponse("/login", status_code=303)
                else:  # EventSource, fetch: a redirect to a page they cannot use helps nobody
                    response = PlainTextResponse("Log in to the dashboard first.", status_code=401)
                clear_session_cookie(response)
            except DomainError as exc:
                response = error_page(request, exc.status, exc.message)
                if isinstance(exc, RateLimited):
                    response.headers["Retry-After"] = str(exc.retry_after)
            except RequestValidationError as exc:
                errors = exc.errors()
                where = loc_to_param(tuple(errors[0].get("loc", ()))) if errors else None
                response = error_page(request, 400, f"Invalid {where or 'request'}.")
            for header, value in SECURITY_HEADERS.items():
                response.headers.setdefault(header, value)
            return response

        return route
