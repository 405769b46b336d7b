"""``/v1/files``: upload (multipart, streamed to storage), list, retrieve, download content, delete."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Form, Query, UploadFile
from fastapi.responses import RedirectResponse, Response, StreamingResponse

from app.deps import Ctx, CurrentCaller, DbSession, IdempotencyKeyHeader
from app.errors import InvalidRequest
from app.models import StoredFile
from app.routes.idempotent import run_idempotent
from app.routes.params import Cursor, FileId
from app.schemas.objects import DeletedObject, ErrorResponse, FileObject, ListObject
from app.services import files as files_service
from app.services import idempotency
from app.services.views import file_view
from app.state import AppContext

router = APIRouter(
    prefix="/v1/files",
    tags=["files"],
    responses={
        400: {"model": ErrorResponse},
        401: {"model": ErrorResponse},
        404: {"model": ErrorResponse},
        429: {"model": ErrorResponse},
    },
)


@router.post("", response_model=FileObject, responses={413: {"model": ErrorResponse}, 422: {"model": ErrorResponse}})
def upload_file(
    ctx: Ctx,
    session: DbSession,
    caller: CurrentCaller,
    file: Annotated[UploadFile, Form()],
    purpose: Annotated[str, Form(max_length=40)],
    idempotency_key: IdempotencyKeyHeader,
) -> FileObject:
    # Size: BodyLimitMiddleware (app.middleware.body_limit) has already refused an oversized body while it
    # streamed in; storage enforces the exact file limit again as it writes.
    if file is None or not hasattr(file, "file"):
        raise InvalidRequest("file is required", param="file")
    row = files_service.upload(
        session,
        ctx.storage,
        project_id=caller.project_id,
        stream=file.file,
        filename=file.filename,
        purpose=purpose,
        max_bytes=ctx.settings.max_upload_bytes,
    )
    fingerprint = idempotency.request_fingerprint("POST", "/v1/files", [purpose, row.filename, row.sha256])
    return run_idempotent(  # type: ignore[no-any-return]
        ctx,
        session,
        caller,
        idempotency_key,
        fingerprint,
        lambda: file_view(row),
        on_replay=lambda: _discard(session, ctx, row),
    )


def _discard(session: DbSession, ctx: Ctx, row: object) -> None:
    session.expunge(row)
    ctx.storage.delete(row.storage_key)  # type: ignore[attr-defined]


@router.get("", response_model=ListObject[FileObject])
def list_files(
    session: DbSession,
    caller: CurrentCaller,
    purpose: Annotated[str | None, Query(max_length=40, pattern=r"^[a-z][a-z_-]*$")] = None,
    after: Cursor = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Literal["asc", "desc"] = "desc",
) -> ListObject[FileObject]:
    rows, has_more = files_service.list_files(
        session, caller.project_id, purpose=purpose, after=after, limit=limit, order=order
    )
    return ListObject[FileObject].page([file_view(r) for r in rows], has_more)


@router.get("/{file_id}", response_model=FileObject)
def retrieve_file(session: DbSession, caller: CurrentCaller, file_id: FileId) -> FileObject:
    return file_view(files_service.get_file(session, caller.project_id, file_id))


@router.delete("/{file_id}", response_model=DeletedObject, responses={409: {"model": ErrorResponse}})
def delete_file(ctx: Ctx, session: DbSession, caller: CurrentCaller, file_id: FileId) -> DeletedObject:
    row = files_service.delete_file(session, ctx.storage, caller.project_id, file_id)
    return DeletedObject(id=row.id, object="file", deleted=True)


@router.get(
    "/{file_id}/content",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
        307: {"description": "With IPO_STORAGE_PRESIGN_SECONDS: the content at a presigned URL (Location)"},
    },
)
def file_content(ctx: Ctx, session: DbSession, caller: CurrentCaller, file_id: FileId) -> Response:
    """The file's bytes, or with ``IPO_STORAGE_PRESIGN_SECONDS`` on S3 storage a ``307`` to a presigned URL."""
    return file_download(ctx, files_service.get_file(session, caller.project_id, file_id))


def file_download(ctx: AppContext, row: StoredFile) -> Response:
    """A download of ``row`` as an attachment: a ``307 Temporary Redirect`` to a presigned URL valid
    ``IPO_STORAGE_PRESIGN_SECONDS`` when that is > 0 and the store has such URLs (``s3://``), else the
    bytes streamed from storage in 1 MiB chunks with ``Content-Length``. Shared by ``/v1`` and the
    dashboard."""
    seconds = ctx.settings.storage_presign_seconds
    url = ctx.storage.presigned_url(row.storage_key, seconds, row.filename) if seconds > 0 else None
    if url is not None:
        return RedirectResponse(url, status_code=307, headers={"Cache-Control": "no-store"})
    return StreamingResponse(
        files_service.file_content(ctx.storage, row),
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{row.filename}"', "Content-Length": str(row.bytes)},
    )
