"""Pre-serialised JSON answers for hot read routes."""

from __future__ import annotations

from typing import Any

from pydantic_core import to_json
from starlette.responses import Response


def json_response(content: Any) -> Response:
    """A 200 whose body is ``content`` (JSON-ready data, e.g. ``app.services.views.job_object``) serialised
    once by pydantic's Rust core, compact like FastAPI's own output.

    A route that declares ``response_model`` (the OpenAPI document is unchanged) and returns this skips
    FastAPI's validation of an object the route has just built from the ledger, and for a sync route the
    thread-pool hop that validation takes.
    """
    return Response(to_json(content), media_type="application/json")
