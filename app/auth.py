"""API keys (``Authorization: Bearer ipo-sk-...``) and the worker token for ``/internal/v1``.

A key is shown once; the database keeps its first characters (for lookup) and a SHA-256 hash.
Keys are 256-bit random, so a fast hash is enough; comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import Unauthorized
from app.models import ApiKey, Project
from app.models.base import new_id, utcnow

KEY_PREFIX = "ipo-sk-"
LOOKUP_CHARS = 16


@dataclass(frozen=True)
class Caller:
    project_id: str
    project_name: str
    key_id: str


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def get_or_create_project(session: Session, name: str) -> Project:
    project = session.scalar(select(Project).where(Project.name == name))
    if project is None:
        project = Project(id=new_id("proj"), name=name, created_at=utcnow())
        session.add(project)
        session.flush()
    return project


def create_key(session: Session, project_name: str, name: str = "") -> tuple[ApiKey, str]:
    """Create an API key for the project (created if missing). Returns the row and the raw key (shown once)."""
    project = get_or_create_project(session, project_name)
    raw = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        id=new_id("key"),
        project_id=project.id,
        name=name,
        prefix=raw[:LOOKUP_CHARS],
        key_hash=hash_key(raw),
        created_at=utcnow(),
    )
    session.add(key)
    session.flush()
    return key, raw


def authenticate(session: Session, authorization: str | None) -> Caller:
    raw = _bearer(authorization)
    if raw is None or not raw.startswith(KEY_PREFIX):
        raise Unauthorized("Missing or malformed API key. Send 'Authorization: Bearer ipo-sk-...'.")
    row = session.execute(
        select(ApiKey, Project.name)
        .join(Project, Project.id == ApiKey.project_id)
        .where(ApiKey.prefix == raw[:LOOKUP_CHARS])
    ).first()
    if row is None or row[0].revoked_at is not None or not hmac.compare_digest(row[0].key_hash, hash_key(raw)):
        raise Unauthorized("Incorrect or revoked API key.")
    key, project_name = row
    return Caller(project_id=key.project_id, project_name=project_name, key_id=key.id)


def check_worker_token(expected: str, authorization: str | None) -> None:
    raw = _bearer(authorization)
    if raw is None or not hmac.compare_digest(raw.encode(), expected.encode()):
        raise Unauthorized("Missing or wrong worker token.", code="invalid_worker_token")


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None
