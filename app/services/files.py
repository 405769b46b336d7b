"""Files: upload (streamed to storage, validated), list, retrieve, download, delete."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from typing import BinaryIO, Literal

from sqlalchemy import and_, event, exists, or_, select, update
from sqlalchemy.orm import Session, SessionTransaction

from app.errors import Conflict, InvalidRequest, NotFound, PayloadTooLarge
from app.models import Checkpoint, FileStatus, Job, JobStatus, StoredFile
from app.models.base import new_id, utcnow
from app.storage import Storage
from app.storage.base import TooLarge
from contracts.sft_formats import validate_training_file

log = logging.getLogger(__name__)

PURPOSES = {"fine-tune"}
RESULT_PURPOSE = "fine-tune-results"
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def safe_filename(name: str | None) -> str:
    """Keep the last path component, ASCII-safe: a client's file name never becomes a storage path."""
    base = (name or "upload").replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = _SAFE_NAME.sub("_", base).strip("._") or "upload"
    return cleaned[:200]


def store_file(
    session: Session,
    storage: Storage,
    *,
    project_id: str,
    stream: BinaryIO,
    filename: str | None,
    purpose: str,
    max_bytes: int | None,
    validate: bool,
) -> StoredFile:
    """Store the stream under a fresh id; for training data, run the preference- or supervised-data validator
    on it (``contracts.sft_formats.validate_training_file``).

    The blob belongs to the session's transaction: if that transaction does not commit (the request is
    refused after the upload, e.g. a 422 for a reused Idempotency-Key, or fails), the blob is deleted,
    so no stored bytes are ever left without a row that names them.
    """
    file_id = new_id("file")
    key = f"{project_id}/{file_id}"
    try:
        obj = storage.put_stream(key, stream, max_bytes=max_bytes)
    except TooLarge as exc:
        raise PayloadTooLarge(f"File is too large: the limit is {max_bytes} bytes.", param="file") from exc
    try:
        row = StoredFile(
            id=file_id,
            project_id=project_id,
            filename=safe_filename(filename),
            purpose=purpose,
            bytes=obj.size,
            sha256=obj.sha256,
            storage_key=key,
            status=FileStatus.PROCESSED,
            created_at=utcnow(),
        )
        if validate:
            with storage.local_copy(key) as path:
                _, report = validate_training_file(path)  # preference or supervised
            row.n_examples = report.n_examples
            row.data_format = report.format
            row.validation = report.model_dump(mode="json")
            if not report.ok:
                row.status = FileStatus.ERROR
                row.status_details = report.summary()[:4000]
        session.add(row)  # begins the session's transaction if none is open
    except BaseException:
        storage.delete(key)
        raise
    delete_unless_committed(session, storage, key)
    return row


_UNCOMMITTED_BLOBS = "ipo.uncommitted_blobs"
"""Session.info: storage keys written during the open transaction, deleted unless it commits."""


def delete_unless_committed(session: Session, storage: Storage, key: str) -> None:
    """Delete the blob ``key`` when the session's current transaction ends without a commit (rollback,
    or close). Its commit keeps the blob."""
    pending: dict[str, Storage] | None = session.info.get(_UNCOMMITTED_BLOBS)
    if pending is None:
        pending = session.info[_UNCOMMITTED_BLOBS] = {}
        event.listen(session, "after_commit", _keep_blobs)
        event.listen(session, "after_transaction_end", _drop_uncommitted_blobs)
    pending[key] = storage


def _keep_blobs(session: Session) -> None:
    session.info.get(_UNCOMMITTED_BLOBS, {}).clear()


def _drop_uncommitted_blobs(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is not None:  # a flush's inner transaction, not the request's
        return
    pending: dict[str, Storage] = session.info.get(_UNCOMMITTED_BLOBS, {})
    for key, storage in list(pending.items()):
        _delete_blob(storage, key)
    pending.clear()


def upload(
    session: Session,
    storage: Storage,
    *,
    project_id: str,
    stream: BinaryIO,
    filename: str | None,
    purpose: str,
    max_bytes: int,
) -> StoredFile:
    if purpose not in PURPOSES:
        raise InvalidRequest(f"purpose must be one of {sorted(PURPOSES)}", param="purpose")
    return store_file(
        session,
        storage,
        project_id=project_id,
        stream=stream,
        filename=filename,
        purpose=purpose,
        max_bytes=max_bytes,
        validate=True,
    )


def get_file(
    session: Session,
    project_id: str,
    file_id: str,
    *,
    param: str = "file_id",
    for_update: bool = False,
    for_share: bool = False,
) -> StoredFile:
    """The project's file; deleted files and other projects' ids answer 404 like missing ones.

    ``for_update`` (deletion) and ``for_share`` (job creation) lock the row (Postgres) so that job
    creation and file deletion serialise on it, while job creations naming the same file do not wait
    for one another.
    """
    stmt = select(StoredFile).where(
        StoredFile.id == file_id, StoredFile.project_id == project_id, StoredFile.deleted_at.is_(None)
    )
    if for_update:
        stmt = stmt.with_for_update()
    elif for_share:
        stmt = stmt.with_for_update(read=True)
    row = session.scalar(stmt)
    if row is None:
        raise NotFound(f"No such file: {file_id}", param=param)
    return row


def list_files(
    session: Session,
    project_id: str,
    *,
    purpose: str | None,
    after: str | None,
    limit: int,
    order: Literal["asc", "desc"],
) -> tuple[list[StoredFile], bool]:
    """Keyset-paginated on (created_at, id), in ``order``; ``after`` is the last id of the previous page."""
    stmt = select(StoredFile).where(StoredFile.project_id == project_id, StoredFile.deleted_at.is_(None))
    if purpose:
        stmt = stmt.where(StoredFile.purpose == purpose)
    if after:
        cursor = session.scalar(select(StoredFile).where(StoredFile.id == after, StoredFile.project_id == project_id))
        if cursor is None:
            raise InvalidRequest(f"after: no such file {after}", param="after")
        if order == "desc":
            stmt = stmt.where(
                or_(
                    StoredFile.created_at < cursor.created_at,
                    and_(StoredFile.created_at == cursor.created_at, StoredFile.id < cursor.id),
                )
            )
        else:
            stmt = stmt.where(
                or_(
                    StoredFile.created_at > cursor.created_at,
                    and_(StoredFile.created_at == cursor.created_at, StoredFile.id > cursor.id),
                )
            )
    keys = (StoredFile.created_at, StoredFile.id)
    ordering = [k.desc() for k in keys] if order == "desc" else list(keys)
    rows = list(session.scalars(stmt.order_by(*ordering).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


_BUSY = (JobStatus.VALIDATING_FILES, JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.PAUSED)


def delete_file(session: Session, storage: Storage, project_id: str, file_id: str) -> StoredFile:
    """Mark the file deleted and remove its blob once (and only if) the transaction commits.

    Refused with 409 while an active job trains or validates on it, or may resume from it (a checkpoint).
    The row stays, so jobs and checkpoints that name it keep their history.
    """
    row = get_file(session, project_id, file_id, for_update=True)
    active = [s.value for s in _BUSY]
    user = session.scalar(
        select(Job.id)
        .where(
            Job.status.in_(active),
            or_(Job.training_file == row.id, Job.validation_file == row.id),
        )
        .limit(1)
    )
    if user is None:
        user = session.scalar(
            select(Job.id)
            .where(
                Job.status.in_(active),
                exists().where(Checkpoint.job_id == Job.id, Checkpoint.file_id == row.id),
            )
            .limit(1)
        )
    if user is not None:
        raise Conflict(
            f"File {row.id} is in use by job {user}; cancel the job or wait for it to finish first.",
            param="file_id",
            code="file_in_use",
        )
    result = session.execute(
        update(StoredFile)
        .where(StoredFile.id == row.id, StoredFile.deleted_at.is_(None))
        .values(deleted_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise NotFound(f"No such file: {file_id}", param="file_id")
    key = row.storage_key
    event.listen(session, "after_commit", lambda _s: _delete_blob(storage, key), once=True)
    return row


def _delete_blob(storage: Storage, key: str) -> None:
    try:
        storage.delete(key)
    except Exception:  # the row is already deleted; a leftover blob is only wasted space
        log.warning("could not delete blob %s of a deleted file", key, exc_info=True)


def file_content(storage: Storage, row: StoredFile) -> Iterator[bytes]:
    return storage.iter_bytes(row.storage_key)
