"""``/internal/v1`` on a real database: claim once, fencing, heartbeat actions, de-duplicated reports,
checkpoints, artifacts, finish, retryable failure -> new attempt, and the reaper."""

from __future__ import annotations

import io
from datetime import timedelta

from fastapi.testclient import TestClient
from sqlalchemy import update

from app.models import Job
from app.models.base import utcnow
from app.services.dispatch import reap_expired_leases
from tests.api.conftest import WORKER


def _queued_job(client: TestClient, upload, auth) -> str:
    file_id = upload().json()["id"]
    r = client.post("/v1/fine_tuning/jobs", headers=auth, json={"model": "tiny-mistral", "training_file": file_id})
    return str(r.json()["id"])


def _claim(client: TestClient, job_id: str, worker: str = "w1"):
    return client.post(f"/internal/v1/jobs/{job_id}/claim", headers=WORKER, json={"worker_id": worker})


def _events(n0: int, n: int) -> list[dict[str, object]]:
    return [
        {"seq": i, "type": "metrics", "message": f"Step {i}", "data": {"step": i, "total_steps": 10}, "created_at": 0}
        for i in range(n0, n0 + n)
    ]


def test_worker_token_required(client: TestClient, upload, auth) -> None:
    job_id = _queued_job(client, upload, auth)
    for headers in ({}, auth, {"Authorization": "Bearer wrong"}):
        assert (
            client.post(f"/internal/v1/jobs/{job_id}/claim", headers=headers, json={"worker_id": "w"}).status_code
            == 401
        )


def test_claim_is_exclusive_and_writes_are_fenced(client: TestClient, upload, auth) -> None:
    job_id = _queued_job(client, upload, auth)
    first = _claim(client, job_id)
    assert first.status_code == 200, first.text
    claim = first.json()
    assert claim["attempt"] == 1 and claim["spec"]["model"] == "tiny-mistral" and claim["resume_from"] is None
    second = _claim(client, job_id, "w2")
    assert second.status_code == 409 and second.json()["error"]["code"] == "not_claimable"
    token = claim["lease_token"]

    stale = client.post(
        f"/internal/v1/jobs/{job_id}/events", headers=WORKER, json={"lease_token": "0" * 32, "events": _events(0, 1)}
    )
    assert stale.status_code == 409 and stale.json()["error"]["code"] == "lease_lost"

    r = client.post(
        f"/internal/v1/jobs/{job_id}/events", headers=WORKER, json={"lease_token": token, "events": _events(0, 3)}
    )
    assert r.json() == {"accepted": 3, "duplicates": 0}
    r = client.post(
        f"/internal/v1/jobs/{job_id}/events", headers=WORKER, json={"lease_token": token, "events": _events(1, 4)}
    )
    assert r.json() == {"accepted": 2, "duplicates": 2}
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth).json()
    assert job["status"] == "running" and job["step"] == 4 and job["total_steps"] == 10
    steps = [
        e["data"]["step"]
        for e in client.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=100", headers=auth).json()["data"]
        if e["type"] == "metrics"
    ]
    assert sorted(steps) == [0, 1, 2, 3, 4]

    hb = client.post(
        f"/internal/v1/jobs/{job_id}/heartbeat",
        headers=WORKER,
        json={"lease_token": token, "resolved_hyperparameters": {"beta": 0.1, "n_epochs": 2}},
    )
    assert hb.json()["action"] == "continue"
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth).json()["hyperparameters"]["n_epochs"] == 2

    ck = client.post(
        f"/internal/v1/jobs/{job_id}/checkpoints",
        headers=WORKER,
        data={"lease_token": token, "step": "4", "metrics": '{"train_loss": 0.5}'},
        files={"file": ("ckpt.zip", io.BytesIO(b"zipbytes"))},
    )
    assert ck.status_code == 200, ck.text
    art = client.post(
        f"/internal/v1/jobs/{job_id}/artifacts",
        headers=WORKER,
        data={"lease_token": token, "name": "adapter"},
        files={"file": ("a.zip", io.BytesIO(b"adapter"))},
    )
    adapter_id = art.json()["file_id"]
    done = client.post(
        f"/internal/v1/jobs/{job_id}/finish",
        headers=WORKER,
        json={"lease_token": token, "trained_tokens": 1234, "adapter_file_id": adapter_id},
    )
    assert done.json()["status"] == "succeeded"
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth).json()
    assert job["result_files"] == [adapter_id] and job["fine_tuned_model"].startswith("ft:tiny-mistral:")
    assert job["trained_tokens"] == 1234 and job["finished_at"] is not None
    assert client.get(f"/v1/files/{adapter_id}/content", headers=auth).content == b"adapter"
    # A retried finish (the worker timed out waiting for the first answer) is answered, not refused.
    again = client.post(
        f"/internal/v1/jobs/{job_id}/finish",
        headers=WORKER,
        json={"lease_token": token, "trained_tokens": 1, "adapter_file_id": adapter_id},
    )
    assert again.status_code == 200 and again.json()["status"] == "succeeded"
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth).json()["trained_tokens"] == 1234
    ckpts = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", headers=auth).json()["data"]
    assert [(c["step_number"], c["metrics"]) for c in ckpts] == [(4, {"step": 4, "train_loss": 0.5})]
    # After finishing, the lease is gone: any further write is fenced off.
    late = client.post(f"/internal/v1/jobs/{job_id}/heartbeat", headers=WORKER, json={"lease_token": token})
    assert late.status_code == 409


def test_cancel_and_pause_reach_the_worker_through_heartbeats(client: TestClient, upload, auth) -> None:
    job_id = _queued_job(client, upload, auth)
    token = _claim(client, job_id).json()["lease_token"]
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/pause", headers=auth).json()["status"] == "paused"
    hb = client.post(f"/internal/v1/jobs/{job_id}/heartbeat", headers=WORKER, json={"lease_token": token})
    assert hb.json()["action"] == "pause"
    early = client.post(f"/v1/fine_tuning/jobs/{job_id}/resume", headers=auth)
    assert early.status_code == 409 and early.json()["error"]["code"] == "pause_in_progress"
    client.post(f"/internal/v1/jobs/{job_id}/stopped", headers=WORKER, json={"lease_token": token, "reason": "paused"})
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/resume", headers=auth).json()["status"] == "queued"
    claim2 = _claim(client, job_id).json()
    assert claim2["attempt"] == 2
    client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=auth)
    hb = client.post(
        f"/internal/v1/jobs/{job_id}/heartbeat", headers=WORKER, json={"lease_token": claim2["lease_token"]}
    )
    assert hb.json()["action"] == "cancel"
    late = client.post(
        f"/internal/v1/jobs/{job_id}/events",
        headers=WORKER,
        json={"lease_token": claim2["lease_token"], "events": _events(0, 1)},
    )
    assert late.status_code == 409  # no events after a cancel


def test_control_long_poll_answers_when_the_status_changes(client: TestClient, upload, auth) -> None:
    """``GET .../control``: at once without ``status``; held while the status is unchanged (here only for
    ``wait_seconds`` 0.3: TestClient runs one request at a time); at once when it already differs."""
    job_id = _queued_job(client, upload, auth)
    _claim(client, job_id)
    control = f"/internal/v1/jobs/{job_id}/control"
    assert client.get(control, headers=WORKER).json() == {"action": "continue", "status": "running"}
    held = client.get(control, headers=WORKER, params={"status": "running", "wait_seconds": 0.3})
    assert held.json() == {"action": "continue", "status": "running"}
    client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=auth)
    changed = client.get(control, headers=WORKER, params={"status": "running", "wait_seconds": 20})
    assert changed.json() == {"action": "cancel", "status": "cancelled"}
    too_long = client.get(control, headers=WORKER, params={"wait_seconds": 600})
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "wait_seconds", too_long.text
    assert client.get(control).status_code == 401
    assert client.get("/internal/v1/jobs/ftjob-nope/control", headers=WORKER).status_code == 404


def test_retryable_failure_requeues_then_fails_after_max_attempts(client: TestClient, upload, auth) -> None:
    job_id = _queued_job(client, upload, auth)
    for attempt in (1, 2):  # settings.max_attempts == 2
        token = _claim(client, job_id).json()["lease_token"]
        r = client.post(
            f"/internal/v1/jobs/{job_id}/fail",
            headers=WORKER,
            json={"lease_token": token, "code": "worker_crashed", "message": "boom", "retryable": True},
        )
        assert r.json()["status"] == ("queued" if attempt == 1 else "failed")
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth).json()
    assert job["error"]["code"] == "worker_crashed" and "2 failed attempts" in job["error"]["message"]


def test_reaper_requeues_expired_lease_with_resume_point(client: TestClient, upload, auth, settings) -> None:
    job_id = _queued_job(client, upload, auth)
    token = _claim(client, job_id).json()["lease_token"]
    client.post(
        f"/internal/v1/jobs/{job_id}/checkpoints",
        headers=WORKER,
        data={"lease_token": token, "step": "6"},
        files={"file": ("c.zip", io.BytesIO(b"c"))},
    )
    sessions = client.app.state.ctx.sessions  # type: ignore[attr-defined]
    with sessions() as session, session.begin():
        session.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    with sessions() as session, session.begin():
        # >= 1: the database is shared by the whole run, and a job claimed by an earlier test has an
        # expired lease too once the run is older than lease_seconds (slow machines).
        assert reap_expired_leases(session, settings) >= 1
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth).json()["status"] == "queued"
    claim = _claim(client, job_id, "w2").json()
    assert claim["attempt"] == 2 and claim["resume_from"]["step"] == 6
    stale = client.post(f"/internal/v1/jobs/{job_id}/heartbeat", headers=WORKER, json={"lease_token": token})
    assert stale.status_code == 409
