"""Reference API for bench/api_bench.py: the smallest FastAPI + SQLAlchemy app doing the same database
work per request as ipo-align's public endpoints (API-key lookup by prefix + hash check; job create =
file check + job + event + outbox rows in one transaction; retrieve; newest-first list; event page).

    python bench/reference_api.py --port 8001 --database-url sqlite:///ref.db --api-key KEY --file-id ID

Sync route functions (FastAPI's thread pool) and one session per request, like the project; no
idempotency, rate limiting, metrics, tenancy checks beyond the project id, or error envelopes.
"""

import argparse
import hashlib
import hmac
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Query
from pydantic import BaseModel
from sqlalchemy import JSON, DateTime, ForeignKey, Integer, String, create_engine, event, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker


class Base(DeclarativeBase):
    pass


def now() -> datetime:
    return datetime.now(UTC)


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prefix: Mapped[str] = mapped_column(String(16), index=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    project_id: Mapped[str] = mapped_column(String(40))


class File(Base):
    __tablename__ = "files"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(40), index=True)
    purpose: Mapped[str] = mapped_column(String(20))


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(40))
    model: Mapped[str] = mapped_column(String(200))
    training_file: Mapped[str] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(20))
    method: Mapped[dict[str, Any]] = mapped_column(JSON)
    seed: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class Event(Base):
    __tablename__ = "job_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    level: Mapped[str] = mapped_column(String(10))
    message: Mapped[str] = mapped_column(String(4000))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Outbox(Base):
    __tablename__ = "outbox"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class JobCreate(BaseModel):
    model: str
    training_file: str
    seed: int | None = None
    method: dict[str, Any] | None = None


class JobOut(BaseModel):
    object: str = "fine_tuning.job"
    id: str
    model: str
    training_file: str
    status: str
    seed: int
    method: dict[str, Any] | None
    created_at: int


class EventOut(BaseModel):
    object: str = "fine_tuning.job.event"
    id: str
    level: str
    message: str
    created_at: int


class Page(BaseModel):
    object: str = "list"
    data: list[Any]
    has_more: bool


def job_out(j: Job) -> JobOut:
    return JobOut(
        id=j.id,
        model=j.model,
        training_file=j.training_file,
        status=j.status,
        seed=j.seed,
        method=j.method,
        created_at=int(j.created_at.timestamp()),
    )


def create_app(database_url: str, pool_size: int = 10) -> FastAPI:
    kwargs: dict[str, Any] = {}
    if database_url.startswith("sqlite"):
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    else:
        kwargs.update(pool_size=pool_size, max_overflow=10)
    engine = create_engine(database_url, **kwargs)
    if database_url.startswith("sqlite"):

        @event.listens_for(engine, "connect")
        def _wal(conn: Any, _: Any) -> None:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")

    Base.metadata.create_all(engine)
    sessions = sessionmaker(engine, expire_on_commit=False)
    app = FastAPI()

    def db() -> Iterator[Session]:
        with sessions() as s, s.begin():
            yield s

    DB = Annotated[Session, Depends(db)]

    def project(s: DB, authorization: Annotated[str | None, Header()] = None) -> str:
        raw = (authorization or "").removeprefix("Bearer ")
        key = s.scalar(select(ApiKey).where(ApiKey.prefix == raw[:16]))
        if key is None or not hmac.compare_digest(key.key_hash, hashlib.sha256(raw.encode()).hexdigest()):
            raise HTTPException(401, "bad key")
        return key.project_id

    Project = Annotated[str, Depends(project)]

    @app.post("/v1/fine_tuning/jobs", response_model=JobOut)
    def create(s: DB, pid: Project, body: JobCreate) -> JobOut:
        f = s.scalar(select(File).where(File.id == body.training_file, File.project_id == pid))
        if f is None:
            raise HTTPException(400, "no such file")
        j = Job(
            id="ftjob-" + secrets.token_hex(12),
            project_id=pid,
            model=body.model,
            training_file=f.id,
            status="queued",
            method=body.method or {},
            seed=body.seed or 42,
            created_at=now(),
        )
        s.add(j)
        s.flush()  # no relationship() declared: flush the job before the event row that references it
        s.add(Event(job_id=j.id, level="info", message="Job created", created_at=now()))
        s.add(Outbox(payload={"job_id": j.id}, created_at=now()))
        s.flush()
        return job_out(j)

    @app.get("/v1/fine_tuning/jobs/{job_id}", response_model=JobOut)
    def retrieve(s: DB, pid: Project, job_id: str) -> JobOut:
        j = s.scalar(select(Job).where(Job.id == job_id, Job.project_id == pid))
        if j is None:
            raise HTTPException(404, "no such job")
        return job_out(j)

    @app.get("/v1/fine_tuning/jobs", response_model=Page)
    def list_jobs(s: DB, pid: Project, limit: Annotated[int, Query(ge=1, le=100)] = 20) -> Page:
        rows = list(
            s.scalars(
                select(Job).where(Job.project_id == pid).order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
            )
        )
        return Page(data=[job_out(j) for j in rows[:limit]], has_more=len(rows) > limit)

    @app.get("/v1/fine_tuning/jobs/{job_id}/events", response_model=Page)
    def events(s: DB, pid: Project, job_id: str, limit: Annotated[int, Query(ge=1, le=100)] = 20) -> Page:
        if s.scalar(select(Job.id).where(Job.id == job_id, Job.project_id == pid)) is None:
            raise HTTPException(404, "no such job")
        rows = list(s.scalars(select(Event).where(Event.job_id == job_id).order_by(Event.id.desc()).limit(limit + 1)))
        data = [
            EventOut(id=f"ftevent-{e.id}", level=e.level, message=e.message, created_at=int(e.created_at.timestamp()))
            for e in rows[:limit]
        ]
        return Page(data=data, has_more=len(rows) > limit)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app, sessions  # type: ignore[return-value]


def main() -> None:
    import uvicorn

    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--database-url", required=True)
    p.add_argument("--api-key", required=True)
    p.add_argument("--file-id", required=True)
    a = p.parse_args()
    app, sessions = create_app(a.database_url)
    with sessions() as s, s.begin():
        s.add(
            ApiKey(prefix=a.api_key[:16], key_hash=hashlib.sha256(a.api_key.encode()).hexdigest(), project_id="proj-1")
        )
        s.add(File(id=a.file_id, project_id="proj-1", purpose="fine-tune"))
    uvicorn.run(app, host="127.0.0.1", port=a.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
