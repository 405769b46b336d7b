"""Reference API for bench/api_bench.py: a lean FastAPI + SQLAlchemy Core app doing the same database work
per request as ipo-align's public job endpoints, on the same database (the project's migrated schema,
reflected at start), so both servers answer the same rows back to back.

    python bench/reference_api.py --port 8001 --database-url postgresql+psycopg://.../db

Per request, as ipo-align does:

- the API key: looked up by its first 16 characters joined to its project, SHA-256 compared in constant
  time, refused when revoked (401);
- retrieve: the job row by id *and* project (tenancy; 404 otherwise), every column;
- list: the newest ``limit + 1`` jobs of the project on (created_at, id), every column;
- events: the job checked by id and project, then the newest ``limit + 1`` of its events;
- create: the training file checked by id and project, then the job, its "created" event and its outbox
  row inserted in one transaction.

Sync routes (FastAPI's thread pool), one connection and transaction per request (``engine.begin()``),
a pool of ``--pool-size`` (api_bench: 40, one per thread-pool thread, no overflow). No rate limit, request ids,
access log, metrics, idempotency, method validation or error envelopes: the rows come back as they
are, in JSON (``json.dumps`` into a ``Response``, times as Unix seconds).
"""

import argparse
import hashlib
import hmac
import json
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Response
from pydantic import BaseModel
from sqlalchemy import Connection, MetaData, create_engine, insert, select

LOOKUP_CHARS = 16


class JobCreate(BaseModel):
    model: str
    training_file: str
    seed: int | None = None
    method: dict[str, Any] | None = None


def _unix(value: Any) -> Any:
    return int(value.timestamp()) if isinstance(value, datetime) else value


def _row(mapping: Any) -> dict[str, Any]:
    return {k: _unix(v) for k, v in mapping.items()}


def _json(content: Any) -> Response:
    return Response(json.dumps(content), media_type="application/json")


def create_app(database_url: str, pool_size: int = 20, max_overflow: int = 0) -> FastAPI:
    """The reference app on ``database_url`` (already migrated by ipo-align: ``app.migrate.upgrade``)."""
    engine = create_engine(database_url, pool_size=pool_size, max_overflow=max_overflow)
    meta = MetaData()
    meta.reflect(engine, only=["projects", "api_keys", "files", "jobs", "job_events", "outbox"])
    projects, keys, files = meta.tables["projects"], meta.tables["api_keys"], meta.tables["files"]
    jobs, events, outbox = meta.tables["jobs"], meta.tables["job_events"], meta.tables["outbox"]
    app = FastAPI()

    def db() -> Iterator[Connection]:
        with engine.begin() as conn:
            yield conn

    Db = Annotated[Connection, Depends(db)]

    def project(conn: Db, authorization: Annotated[str | None, Header()] = None) -> str:
        raw = (authorization or "").removeprefix("Bearer ")
        row = conn.execute(
            select(keys.c.key_hash, keys.c.revoked_at, keys.c.project_id, projects.c.name)
            .join(projects, projects.c.id == keys.c.project_id)
            .where(keys.c.prefix == raw[:LOOKUP_CHARS])
        ).first()
        if (
            row is None
            or row.revoked_at is not None
            or not hmac.compare_digest(row.key_hash, hashlib.sha256(raw.encode()).hexdigest())
        ):
            raise HTTPException(401, "bad key")
        return str(row.project_id)

    Project = Annotated[str, Depends(project)]

    @app.post("/v1/fine_tuning/jobs")
    def create(conn: Db, pid: Project, body: JobCreate) -> Response:
        f = conn.execute(select(files.c.id).where(files.c.id == body.training_file, files.c.project_id == pid)).first()
        if f is None:
            raise HTTPException(400, "no such file")
        now = datetime.now(UTC)
        job = {
            "id": "ftjob-" + secrets.token_hex(12),
            "project_id": pid,
            "status": "queued",
            "model": body.model,
            "training_file": body.training_file,
            "seed": body.seed or 42,
            "method": body.method or {},
            "attempt": 0,
            "failed_attempts": 0,
            "created_at": now,
            "queued_at": now,
        }
        conn.execute(insert(jobs).values(**job))
        conn.execute(
            insert(events).values(
                job_id=job["id"], project_id=pid, type="message", level="info", message="Job created", created_at=now
            )
        )
        conn.execute(
            insert(outbox).values(
                project_id=pid, kind="dispatch_job", payload={"job_id": job["id"]}, created_at=now, attempts=0
            )
        )
        return _json(_row(job))

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    def retrieve(conn: Db, pid: Project, job_id: str) -> Response:
        row = conn.execute(select(jobs).where(jobs.c.id == job_id, jobs.c.project_id == pid)).first()
        if row is None:
            raise HTTPException(404, "no such job")
        return _json(_row(row._mapping))

    @app.get("/v1/fine_tuning/jobs")
    def list_jobs(conn: Db, pid: Project, limit: Annotated[int, Query(ge=1, le=100)] = 20) -> Response:
        rows = conn.execute(
            select(jobs)
            .where(jobs.c.project_id == pid)
            .order_by(jobs.c.created_at.desc(), jobs.c.id.desc())
            .limit(limit + 1)
        ).all()
        return _json(
            {"object": "list", "data": [_row(r._mapping) for r in rows[:limit]], "has_more": len(rows) > limit}
        )

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    def list_events(conn: Db, pid: Project, job_id: str, limit: Annotated[int, Query(ge=1, le=100)] = 20) -> Response:
        if conn.execute(select(jobs.c.id).where(jobs.c.id == job_id, jobs.c.project_id == pid)).first() is None:
            raise HTTPException(404, "no such job")
        rows = conn.execute(
            select(events).where(events.c.job_id == job_id).order_by(events.c.id.desc()).limit(limit + 1)
        ).all()
        data = [{**_row(r._mapping), "id": f"ftevent-{r.id}"} for r in rows[:limit]]
        return _json({"object": "list", "data": data, "has_more": len(rows) > limit})

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main() -> None:
    import uvicorn

    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--database-url", required=True)
    p.add_argument("--pool-size", type=int, default=20)
    p.add_argument("--max-overflow", type=int, default=0)
    a = p.parse_args()
    uvicorn.run(
        create_app(a.database_url, a.pool_size, a.max_overflow),
        host="127.0.0.1",
        port=a.port,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
