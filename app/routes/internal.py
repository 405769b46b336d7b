"""``/internal/v1``: the worker protocol (worker token auth). See ``app.services.worker_protocol``."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Form, Query, UploadFile
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from app.deps import Ctx, DbSession, require_worker
from app.errors import InvalidRequest, NotFound
from app.models import StoredFile
from app.schemas.objects import ErrorResponse
from app.services import worker_protocol as wp
from app.services.files import file_content
from contracts.internal import (
    CONTROL_WAIT_SECONDS_MAX,
    ClaimRequest,
    ClaimResponse,
    ControlResponse,
    EventsRequest,
    EventsResponse,
    FailRequest,
    FinishRequest,
    HeartbeatRequest,
    HeartbeatResponse,
    StoppedRequest,
)

router = APIRouter(
    prefix="/internal/v1",
    tags=["internal"],
    dependencies=[Depends(require_worker)],
    responses={
        400: {"model": ErrorResponse},
        401: {"model": ErrorResponse},
        404: {"model": ErrorResponse},
        409: {"model": ErrorResponse},
    },
)


class Ack(BaseModel):
    id: str
    status: str | None = None


class ArtifactAck(BaseModel):
    file_id: str


@router.post("/jobs/{job_id}/claim", response_model=ClaimResponse)
def claim(ctx: Ctx, session: DbSession, job_id: str, body: ClaimRequest) -> ClaimResponse:
    return wp.claim(session, ctx.settings, job_id, body.worker_id)


@router.post("/jobs/{job_id}/heartbeat", response_model=HeartbeatResponse)
def heartbeat(ctx: Ctx, session: DbSession, job_id: str, body: HeartbeatRequest) -> HeartbeatResponse:
    return wp.heartbeat(session, ctx.settings, job_id, body)


CONTROL_POLL_SECONDS = 0.5
"""How often a held ``control`` request re-reads the job: a cancel or pause reaches the worker within about
this long (plus the trainer's current step), instead of at its next heartbeat (30 s by default)."""


@router.get("/jobs/{job_id}/control", response_model=ControlResponse)
async def control(
    ctx: Ctx,
    job_id: str,
    status: Annotated[
        str | None, Query(max_length=40, description="Answer once the job's status differs from this one.")
    ] = None,
    wait_seconds: Annotated[float, Query(ge=0, le=CONTROL_WAIT_SECONDS_MAX)] = 20.0,
) -> ControlResponse:
    """Long-poll: the job's requested action as soon as its status is not ``status`` (at once when ``status``
    is absent), else after ``wait_seconds``. Async, and each read in its own short session, so a held
    request costs the API no thread and no connection. Works on every database: it only reads the job."""

    def read() -> ControlResponse:
        with ctx.sessions() as session:
            return wp.control(session, job_id)

    deadline = time.monotonic() + wait_seconds
    while True:
        answer = await run_in_threadpool(read)
        left = deadline - time.monotonic()
        if status is None or answer.status != status or left <= 0:
            return answer
        await asyncio.sleep(min(CONTROL_POLL_SECONDS, left))


@router.post("/jobs/{job_id}/events", response_model=EventsResponse)
def events(session: DbSession, job_id: str, body: EventsRequest) -> EventsResponse:
    return wp.report_events(session, job_id, body)


@router.post("/jobs/{job_id}/checkpoints", response_model=Ack)
def checkpoint(
    ctx: Ctx,
    session: DbSession,
    job_id: str,
    lease_token: Annotated[str, Form()],
    step: Annotated[int, Form(ge=0)],
    file: Annotated[UploadFile, Form()],
    metrics: Annotated[str, Form()] = "{}",
) -> Ack:
    try:
        parsed = json.loads(metrics)
    except ValueError as exc:
        raise InvalidRequest("metrics must be a JSON object", param="metrics") from exc
    if not isinstance(parsed, dict):
        raise InvalidRequest("metrics must be a JSON object", param="metrics")
    ckpt = wp.add_checkpoint(
        session, ctx.storage, job_id, lease_token, step, parsed, file.file, file.filename or f"{job_id}-step-{step}.zip"
    )
    return Ack(id=ckpt.id)


@router.post("/jobs/{job_id}/artifacts", response_model=ArtifactAck)
def artifact(
    ctx: Ctx,
    session: DbSession,
    job_id: str,
    lease_token: Annotated[str, Form()],
    name: Annotated[str, Form()],
    file: Annotated[UploadFile, Form()],
) -> ArtifactAck:
    row = wp.add_artifact(session, ctx.storage, job_id, lease_token, file.file, file.filename or f"{job_id}-{name}")
    return ArtifactAck(file_id=row.id)


@router.post("/jobs/{job_id}/finish", response_model=Ack)
def finish(session: DbSession, job_id: str, body: FinishRequest) -> Ack:
    job = wp.finish(session, job_id, body)
    return Ack(id=job.id, status=job.status)


@router.post("/jobs/{job_id}/fail", response_model=Ack)
def fail(ctx: Ctx, session: DbSession, job_id: str, body: FailRequest) -> Ack:
    job = wp.fail(session, ctx.settings, job_id, body)
    return Ack(id=job.id, status=job.status)


@router.post("/jobs/{job_id}/stopped", response_model=Ack)
def stopped(ctx: Ctx, session: DbSession, job_id: str, body: StoppedRequest) -> Ack:
    job = wp.stopped(session, job_id, body)
    return Ack(id=job.id, status=job.status)


@router.get(
    "/files/{file_id}/content",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}},
)
def internal_file_content(ctx: Ctx, session: DbSession, file_id: str) -> StreamingResponse:
    row = session.scalar(select(StoredFile).where(StoredFile.id == file_id))
    if row is None:
        raise NotFound(f"No such file: {file_id}")
    return StreamingResponse(
        file_content(ctx.storage, row),
        media_type="application/octet-stream",
        headers={"Content-Length": str(row.bytes)},
    )
