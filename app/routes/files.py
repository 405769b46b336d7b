"""``/v1/files``: upload (multipart, streamed to storage), list, retrieve, download content, delete."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Form, Query, UploadFile
from fastapi.responses import StreamingResponse

from app.deps import Ctx, CurrentCaller, DbSession, IdempotencyKeyHeader
from app.errors import InvalidRequest
from app.routes.idempotent import run_idempotent
from app.routes.params import Cursor, FileId
from app.schemas.objects import DeletedObject, ErrorResponse, FileObject, ListObject
from app.services import files as files_service
from app.services import idempotency
from app.services.views import file_view

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
    responses={200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}},
)
def file_content(ctx: Ctx, session: DbSession, caller: CurrentCaller, file_id: FileId) -> StreamingResponse:
    row = files_service.get_file(session, caller.project_id, file_id)
    return StreamingResponse(
        files_service.file_content(ctx.storage, row),
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{row.filename}"', "Content-Length": str(row.bytes)},
    )
