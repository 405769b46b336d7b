"""Pagination at scale: a job-list page and an event page cost the same with 100,000 jobs and 1,000,000
events as with 100 (keyset pagination on indexed columns), on Postgres.

    BENCH_DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/postgres python -m bench.pagination_scale

One fresh database, measured twice through the real app (``create_app`` + TestClient: auth, the
query, JSON): first with 100 jobs and 1,000 events, then after bulk-inserting (``generate_series``)
up to 100,000 jobs and 1,000,000 events. The measured "hot" job is the oldest and has 10,000 events
(a long run logging every step); the other 990,000 are spread over the rest. Each figure is the p50 of
``--requests`` calls: the first page and a deep page (``after`` = a cursor in the middle) of
``GET /v1/fine_tuning/jobs`` and of the hot job's ``GET .../events``. The ratio is large / small (the
reference is the same request on the small database, in the same run). The Postgres plan of each deep
page is printed, to show an index range scan rather than a sort of the table.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from bench._common import fresh_database, pct, record, wait_for_quiet

SMALL_JOBS, SMALL_EVENTS = 100, 1_000
LARGE_JOBS, LARGE_EVENTS = 100_000, 1_000_000


def fill(database_url: str, project_id: str, file_id: str, jobs: int, events: int) -> None:
    """Grow the tables to ``jobs`` jobs and ``events`` events (1% on job 1, the rest spread evenly).

    One job holding half of all events would be a different workload: Postgres then estimates that a
    backward walk of the primary key finds its newest events at once, but they are the oldest rows, and
    the first page costs ~50 ms (seen with this bench); at 1% it uses the (job_id, id) index."""
    engine = create_engine(database_url)
    with engine.begin() as conn:
        have_jobs = conn.scalar(text("SELECT count(*) FROM jobs"))
        conn.execute(
            text(
                """INSERT INTO jobs (id, project_id, status, model, training_file, seed, method, attempt,
                       failed_attempts, created_at, queued_at)
                   SELECT 'ftjob-' || lpad(g::text, 24, '0'), :pid, 'succeeded', 'tiny-mistral', :fid, g,
                          '{"type": "ipo"}'::jsonb, 1, 0, now() - (g || ' seconds')::interval, now()
                   FROM generate_series(CAST(:start AS bigint), CAST(:stop AS bigint)) AS g"""
            ),
            {"pid": project_id, "fid": file_id, "start": have_jobs + 1, "stop": jobs},
        )
        have_events = conn.scalar(text("SELECT count(*) FROM job_events"))
        hot = events // 100 - have_events // 100
        rest = events - have_events - hot
        conn.execute(
            text(
                """INSERT INTO job_events (job_id, project_id, type, level, message, data, created_at)
                   SELECT 'ftjob-' || lpad('1', 24, '0'), :pid, 'metrics', 'info', 'step ' || g,
                          jsonb_build_object('step', g, 'train_loss', 1.0 / g), now()
                   FROM generate_series(1, CAST(:n AS bigint)) AS g"""
            ),
            {"pid": project_id, "n": hot},
        )
        conn.execute(
            text(
                """INSERT INTO job_events (job_id, project_id, type, level, message, data, created_at)
                   SELECT 'ftjob-' || lpad((2 + g % (:jobs - 1))::text, 24, '0'), :pid, 'message', 'info',
                          'event ' || g, NULL, now()
                   FROM generate_series(1, CAST(:n AS bigint)) AS g"""
            ),
            {"pid": project_id, "n": rest, "jobs": jobs},
        )
        conn.execute(text("ANALYZE jobs; ANALYZE job_events"))
    engine.dispose()


def timed(client: TestClient, url: str, headers: dict[str, str], n: int) -> float:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = client.get(url, headers=headers)
        samples.append((time.perf_counter() - t0) * 1e3)
        assert r.status_code == 200, r.text
    return pct(samples, 50)


def plan(database_url: str, sql: str) -> str:
    engine = create_engine(database_url)
    with engine.connect() as conn:
        rows = [r[0] for r in conn.execute(text("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) " + sql))]
    engine.dispose()
    return " / ".join(r.strip() for r in rows if any(w in r for w in ("Scan", "Sort", "Limit", "Filter", "Cond")))


def measure(client: TestClient, headers: dict[str, str], jobs: int, event_cursor: int, n: int) -> dict[str, float]:
    hot = "ftjob-" + "1".rjust(24, "0")
    middle_job = "ftjob-" + str(jobs // 2).rjust(24, "0")
    return {
        "jobs first": timed(client, "/v1/fine_tuning/jobs?limit=20", headers, n),
        "jobs deep": timed(client, f"/v1/fine_tuning/jobs?limit=20&after={middle_job}", headers, n),
        "events first": timed(client, f"/v1/fine_tuning/jobs/{hot}/events?limit=20", headers, n),
        "events deep": timed(
            client, f"/v1/fine_tuning/jobs/{hot}/events?limit=20&after=ftevent-{event_cursor}", headers, n
        ),
    }


def deep_event_cursor(database_url: str) -> int:
    """An event id in the middle of the hot job's events."""
    engine = create_engine(database_url)
    with engine.connect() as conn:
        low, high = conn.execute(
            text("SELECT min(id), max(id) FROM job_events WHERE job_id = :j"), {"j": "ftjob-" + "1".rjust(24, "0")}
        ).one()
    engine.dispose()
    return (int(low) + int(high)) // 2


def service_sql(project_id: str, middle_job: str, database_url: str) -> tuple[str, str]:
    """The SQL the API runs for a deep page of each list (compiled from the services' own statements)."""
    from sqlalchemy import select
    from sqlalchemy.dialects import postgresql
    from sqlalchemy.orm import Session

    from app.models import Job, JobEvent
    from app.services.jobs import _older_than

    engine = create_engine(database_url)
    with Session(engine) as session:
        cursor = session.get(Job, middle_job)
        assert cursor is not None
        jobs = (
            select(Job)
            .where(Job.project_id == project_id, _older_than(cursor))
            .order_by(Job.created_at.desc(), Job.id.desc())
            .limit(21)
        )
        events = (
            select(JobEvent)
            .where(JobEvent.job_id == "ftjob-" + "1".rjust(24, "0"), JobEvent.id < deep_event_cursor(database_url))
            .order_by(JobEvent.id.desc())
            .limit(21)
        )
        compiled = [
            str(q.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True})) for q in (jobs, events)
        ]
    engine.dispose()
    return compiled[0], compiled[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=200, help="calls per figure (the p50 is reported)")
    a = p.parse_args()
    if not os.environ.get("BENCH_DATABASE_URL"):
        raise SystemExit("pagination_scale needs Postgres: set BENCH_DATABASE_URL (an admin URL)")
    wait_for_quiet()
    from app.auth import create_key
    from app.db import make_engine, make_sessionmaker
    from app.main import create_app
    from app.migrate import upgrade
    from app.settings import Settings

    with tempfile.TemporaryDirectory() as tmp, fresh_database(Path(tmp), "pages") as url:
        upgrade(url)
        engine = make_engine(url)
        with make_sessionmaker(engine)() as session, session.begin():
            key_row, key = create_key(session, "bench-pages")
            project_id = key_row.project_id
        engine.dispose()
        with create_engine(url).begin() as conn:
            conn.execute(
                text(
                    """INSERT INTO files (id, project_id, filename, purpose, bytes, sha256, storage_key, status,
                       created_at) VALUES ('file-bench', :pid, 't.jsonl', 'fine-tune', 1, '0', 'k', 'processed',
                       now())"""
                ),
                {"pid": project_id},
            )
        settings = Settings(
            var_dir=Path(tmp) / "var",
            database_url=url,
            run_dispatcher=False,
            run_webhook_sender=False,
            rate_limit_per_minute=0,
        )
        headers = {"Authorization": f"Bearer {key}"}
        results = {}
        for label, jobs, events in (("small", SMALL_JOBS, SMALL_EVENTS), ("large", LARGE_JOBS, LARGE_EVENTS)):
            started = time.monotonic()
            fill(url, project_id, "file-bench", jobs, events)
            print(f"[{label}] {jobs} jobs, {events} events in the database ({time.monotonic() - started:.0f}s to fill)")
            with TestClient(create_app(settings)) as client:
                results[label] = measure(client, headers, jobs, deep_event_cursor(url), a.requests)
            print(f"[{label}] p50 ms: { {k: round(v, 2) for k, v in results[label].items()} }")
        jobs_sql, events_sql = service_sql(project_id, "ftjob-" + str(LARGE_JOBS // 2).rjust(24, "0"), url)
        jobs_plan, events_plan = plan(url, jobs_sql), plan(url, events_sql)
        print(f"plan, jobs deep page: {jobs_plan}\nplan, events deep page: {events_plan}")
    small, large = results["small"], results["large"]
    cells = {"requests": f"p50 of {a.requests} per figure"}
    for name in ("jobs first", "jobs deep", "events first", "events deep"):
        cells[name] = f"{small[name]:.2f} ms -> {large[name]:.2f} ms (**{large[name] / small[name]:.2f}x**)"
    cells["scale"] = f"{SMALL_JOBS} jobs / {SMALL_EVENTS} events -> {LARGE_JOBS} jobs / {LARGE_EVENTS} events"
    cells["plans (large, deep pages)"] = f"jobs: {jobs_plan}; events: {events_plan}"
    record("pagination_scale", "pagination_scale", cells)


if __name__ == "__main__":
    main()
