"""Files: upload (streamed to storage, validated), retrieve, download."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import BinaryIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import InvalidRequest, NotFound, PayloadTooLarge
from app.models import FileStatus, StoredFile
from app.models.base import new_id, utcnow
from app.storage import Storage
from app.storage.base import TooLarge
from contracts.data_formats import parse_preference_file

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
    """Store the stream under a fresh id; for training data, run the preference-data validator on it."""
    file_id = new_id("file")
    key = f"{project_id}/{file_id}"
    try:
        obj = storage.put_stream(key, stream, max_bytes=max_bytes)
    except TooLarge as exc:
        raise PayloadTooLarge(f"File is too large: the limit is {max_bytes} bytes.", param="file") from exc
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
        try:
            _, report = parse_preference_file(storage.local_path(key))
        except BaseException:
            storage.delete(key)
            raise
        row.n_examples = report.n_examples
        row.data_format = report.format
        row.validation = report.model_dump(mode="json")
        if not report.ok:
            row.status = FileStatus.ERROR
            row.status_details = report.summary()[:4000]
    session.add(row)
    return row


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


def get_file(session: Session, project_id: str, file_id: str, *, param: str = "file_id") -> StoredFile:
    row = session.scalar(select(StoredFile).where(StoredFile.id == file_id, StoredFile.project_id == project_id))
    if row is None:
        raise NotFound(f"No such file: {file_id}", param=param)
    return row


def file_content(storage: Storage, row: StoredFile) -> Iterator[bytes]:
    return storage.iter_bytes(row.storage_key)
