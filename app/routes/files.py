"""``/v1/files``: upload (multipart, streamed to storage), retrieve, download content."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request, UploadFile
from fastapi.responses import StreamingResponse

from app.deps import Ctx, CurrentCaller, DbSession, IdempotencyKeyHeader
from app.errors import InvalidRequest, PayloadTooLarge
from app.routes.idempotent import run_idempotent
from app.schemas.objects import ErrorResponse, FileObject
from app.services import files as files_service
from app.services import idempotency
from app.services.views import file_view

router = APIRouter(
    prefix="/v1/files",
    tags=["files"],
    responses={400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}},
)


def reject_oversized(request: Request, limit: int) -> None:
    """Refuse before reading a byte of the body when the client announces too much."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit + 64 * 1024:  # multipart framing allowance
        raise PayloadTooLarge(f"File is too large: the limit is {limit} bytes.", param="file")


@router.post("", response_model=FileObject, responses={413: {"model": ErrorResponse}})
def upload_file(
    ctx: Ctx,
    session: DbSession,
    caller: CurrentCaller,
    request: Request,
    file: Annotated[UploadFile, Form()],
    purpose: Annotated[str, Form(max_length=40)],
    idempotency_key: IdempotencyKeyHeader = None,
) -> FileObject:
    reject_oversized(request, ctx.settings.max_upload_bytes)
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
    print_ = idempotency.fingerprint("POST", "/v1/files", [purpose, row.filename, row.sha256])
    return run_idempotent(
        ctx,
        session,
        caller,
        idempotency_key,
        print_,
        lambda: file_view(row),
        on_replay=lambda: _discard(session, ctx, row),
    )


def _discard(session: DbSession, ctx: Ctx, row: object) -> None:
    session.expunge(row)
    ctx.storage.delete(row.storage_key)  # type: ignore[attr-defined]


@router.get("/{file_id}", response_model=FileObject)
def retrieve_file(session: DbSession, caller: CurrentCaller, file_id: str) -> FileObject:
    return file_view(files_service.get_file(session, caller.project_id, file_id))


@router.get(
    "/{file_id}/content",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def file_content(ctx: Ctx, session: DbSession, caller: CurrentCaller, file_id: str) -> StreamingResponse:
    row = files_service.get_file(session, caller.project_id, file_id)
    return StreamingResponse(
        files_service.file_content(ctx.storage, row),
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{row.filename}"', "Content-Length": str(row.bytes)},
    )
