"""``GET /metrics``: ledger gauges, queue-wait and duration histograms, per-worker throughput, HTTP latency
by route template, all scraped through the real endpoint after driving jobs through /v1 and /internal/v1."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.api import worker_steps
from tests.api.conftest import WORKER

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "ipo-align.json"


def scrape(client: TestClient) -> tuple[str, Samples]:
    r = client.get("/metrics")  # no Authorization: unauthenticated like /healthz
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return r.text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _job(client: TestClient, upload, auth) -> str:
    file_id = upload().json()["id"]
    r = client.post("/v1/fine_tuning/jobs", headers=auth, json={"model": "tiny-mistral", "training_file": file_id})
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def test_job_lifecycle_metrics(client: TestClient, upload, auth) -> None:
    _, before = scrape(client)
    done, cancelled = _job(client, upload, auth), _job(client, upload, auth)
    _, queued = scrape(client)
    assert value(queued, "ipo_jobs", status="queued") == value(before, "ipo_jobs", status="queued") + 2
    assert value(queued, "ipo_queue_depth") == value(before, "ipo_queue_depth") + 2
    # no dispatcher runs in these tests: the two doorbells wait in the outbox
    assert value(queued, "ipo_outbox_pending") == value(before, "ipo_outbox_pending") + 2
    assert ("ipo_jobs", frozenset({("status", "paused")})) in queued  # every status is exposed, zeros included

    worker = f"gpu-{secrets.token_hex(3)}"
    claim = client.post(f"/internal/v1/jobs/{done}/claim", headers=WORKER, json={"worker_id": worker})
    token = claim.json()["lease_token"]
    report = {"step": 3, "total_steps": 10, "tokens_per_second": 1234.5, "gpu_memory_bytes": 7 * 2**30}
    r = client.post(
        f"/internal/v1/jobs/{done}/events",
        headers=WORKER,
        json={
            "lease_token": token,
            "events": [{"seq": 0, "type": "metrics", "message": "s", "data": report, "created_at": 0}],
        },
    )
    assert r.status_code == 200, r.text
    text, running = scrape(client)
    assert value(running, "ipo_job_queue_wait_seconds_count") == value(before, "ipo_job_queue_wait_seconds_count") + 1
    assert value(running, "ipo_jobs", status="running") == value(before, "ipo_jobs", status="running") + 1
    assert value(running, "ipo_queue_depth") == value(before, "ipo_queue_depth") + 1
    assert value(running, "ipo_worker_tokens_per_second", worker=worker) == 1234.5
    assert value(running, "ipo_worker_gpu_memory_bytes", worker=worker) == 7 * 2**30
    assert value(running, "ipo_ledger_up") == 1

    worker_steps.add_checkpoint(client, WORKER, done, token, 1)
    adapter = client.post(
        f"/internal/v1/jobs/{done}/artifacts",
        headers=WORKER,
        data={"lease_token": token, "name": "adapter"},
        files={"file": ("adapter.zip", b"adapter")},
    ).json()["file_id"]
    r = client.post(
        f"/internal/v1/jobs/{done}/finish", headers=WORKER, json={"lease_token": token, "adapter_file_id": adapter}
    )
    assert r.status_code == 200, r.text
    assert client.post(f"/v1/fine_tuning/jobs/{cancelled}/cancel", headers=auth).status_code == 200
    # A refused transition (409) rolls back, so it observes nothing.
    assert client.post(f"/v1/fine_tuning/jobs/{cancelled}/cancel", headers=auth).status_code == 409

    text, after = scrape(client)
    for outcome in ("succeeded", "cancelled"):
        key = "ipo_job_duration_seconds_count"
        assert value(after, key, outcome=outcome) == value(before, key, outcome=outcome) + 1, outcome
    assert value(after, "ipo_worker_tokens_per_second", worker=worker) == 0  # its job ended: the worker is gone
    assert value(after, "ipo_jobs", status="succeeded") == value(before, "ipo_jobs", status="succeeded") + 1
    assert value(after, "ipo_queue_depth") == value(before, "ipo_queue_depth")
    # Aggregates only: no job, file or project id ever appears.
    assert done not in text and cancelled not in text and "ftjob-" not in text and "proj-" not in text


def test_http_latency_is_labelled_by_route_template(client: TestClient, upload, auth) -> None:
    job_id = _job(client, upload, auth)
    key = "ipo_http_request_duration_seconds_count"
    _, before = scrape(client)
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth).status_code == 200
    assert client.get("/v1/fine_tuning/jobs/ftjob-nope", headers=auth).status_code == 404
    assert client.get(f"/no/such/{job_id}").status_code == 404
    text, after = scrape(client)
    route = "/v1/fine_tuning/jobs/{job_id}"
    for status in ("200", "404"):
        labels = {"method": "GET", "route": route, "status": status}
        assert value(after, key, **labels) == value(before, key, **labels) + 1, status
    unmatched = {"method": "GET", "route": "<unmatched>", "status": "404"}
    assert value(after, key, **unmatched) == value(before, key, **unmatched) + 1
    assert job_id not in text and "ftjob-nope" not in text


def test_grafana_dashboard_uses_exposed_metrics(client: TestClient, upload, auth) -> None:
    worker_steps.succeed(client, WORKER, _job(client, upload, auth))
    client.get("/healthz")
    text, _ = scrape(client)
    families = set(re.findall(r"^# TYPE (ipo_[a-z_]+) ", text, re.M))
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {name for e in exprs for name in re.findall(r"\b(ipo_[a-z_]+)", e)}
    missing = {n for n in used if n not in families and re.sub(r"_(bucket|count|sum|total)$", "", n) not in families}
    assert len(used) >= 8 and not missing, missing


def test_multiprocess_mode_aggregates_from_the_shared_directory(tmp_path: Path, migrated_url: str) -> None:
    """With PROMETHEUS_MULTIPROC_DIR set (several uvicorn workers), /metrics reads every process's files."""
    code = (
        "from fastapi.testclient import TestClient\n"
        "from app.main import create_app\n"
        "from app.settings import Settings\n"
        f"s = Settings(var_dir={str(tmp_path / 'var')!r}, database_url={migrated_url!r}, run_dispatcher=False,"
        " run_webhook_sender=False)\n"
        "with TestClient(create_app(s)) as c:\n"
        "    c.get('/healthz'); c.get('/healthz')\n"
        "    print(c.get('/metrics').text)\n"
    )
    shared = tmp_path / "prom"
    shared.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(shared)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert 'ipo_http_request_duration_seconds_count{method="GET",route="/healthz",status="200"} 2.0' in out
    assert "ipo_jobs{" in out and "ipo_ledger_up 1.0" in out  # ledger gauges do not depend on the mode
    assert any(shared.iterdir())
