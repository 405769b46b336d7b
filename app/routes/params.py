"""Path and query parameters shared by the public routes.

Ids are checked for shape before they reach SQL: a malformed id (or one carrying a NUL, which Postgres
cannot even compare) is a 400 naming the parameter; a well-formed id that is not the caller's is a 404.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Query

from app.schemas.requests import ID_PATTERN

FileId = Annotated[str, Path(max_length=64, pattern=ID_PATTERN)]
JobId = Annotated[str, Path(max_length=64, pattern=ID_PATTERN)]
ModelId = Annotated[str, Path(max_length=300, pattern=ID_PATTERN)]
Cursor = Annotated[str | None, Query(max_length=64, pattern=ID_PATTERN)]
