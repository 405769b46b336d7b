"""Public API on a real database: files, jobs, events, transitions, errors, tenancy, idempotency."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from tests.api.conftest import pref_line


def _job(client: TestClient, auth: dict[str, str], file_id: str, **extra: object):
    body = {"model": "tiny-mistral", "training_file": file_id, "method": {"type": "ipo"}, **extra}
    return client.post("/v1/fine_tuning/jobs", headers=auth, json=body)


def test_upload_valid_file_is_processed(upload) -> None:
    r = upload()
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "file" and body["status"] == "processed" and body["purpose"] == "fine-tune"
    assert body["id"].startswith("file-") and body["bytes"] > 0


def test_file_round_trip_and_tenancy(client: TestClient, upload, auth, other_auth, good_jsonl) -> None:
    file_id = upload().json()["id"]
    assert client.get(f"/v1/files/{file_id}", headers=auth).json()["id"] == file_id
    content = client.get(f"/v1/files/{file_id}/content", headers=auth)
    assert content.status_code == 200 and content.content == good_jsonl
    # Another project's id answers exactly like a missing one.
    for path in (f"/v1/files/{file_id}", f"/v1/files/{file_id}/content", "/v1/files/file-doesnotexist"):
        r = client.get(path, headers=other_auth)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_path_traversal_filename_is_neutralised(upload) -> None:
    r = upload(name="../../etc/passwd")
    assert r.status_code == 200 and r.json()["filename"] == "passwd"


def test_oversized_upload_is_413_and_stores_nothing(upload, settings) -> None:
    r = upload(content=b"x" * 300_000)
    assert r.status_code == 413 and r.json()["error"]["param"] == "file"
    store = settings.var_dir / "storage"
    assert not store.exists() or not [p for p in store.rglob("*") if p.is_file()]


def test_auth_errors(client: TestClient) -> None:
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Bearer ipo-sk-forged-key-0000000000"}):
        r = client.get("/v1/fine_tuning/jobs", headers=headers)
        assert r.status_code == 401
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_bad_training_file_gives_400_with_lines_and_creates_no_job(client, upload, auth) -> None:
    bad = (pref_line(1) + "\n{not json\n" + '{"prompt": "x"}\n').encode()
    file = upload(content=bad).json()
    assert file["status"] == "error" and "line 2" in file["status_details"]
    r = _job(client, auth, file["id"])
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "training_file" and "line 2" in err["message"] and "line 3" in err["message"]
    assert client.get("/v1/fine_tuning/jobs", headers=auth).json()["data"] == []


def test_job_create_validation_errors_name_the_field(client, upload, auth) -> None:
    file_id = upload().json()["id"]
    cases: list[tuple[dict[str, Any], str]] = [
        ({"model": "no-such-model"}, "model"),
        ({"training_file": "file-missing"}, "training_file"),
        ({"method": {"type": "ipo", "ipo": {"hyperparameters": {"beta": -1}}}}, "method.ipo.hyperparameters.beta"),
        ({"method": {"type": "ipo", "ipo": {"lora": {"r": 0}}}}, "method.ipo.lora.r"),
        ({"method": {"type": "ppo"}}, "method.type"),
        ({"surprise": 1}, "surprise"),
        ({"metadata": {"k": "v\r\nX-Injected: 1"}}, "metadata"),
    ]
    for extra, param in cases:
        body = {"model": "tiny-mistral", "training_file": file_id, **extra}
        r = client.post("/v1/fine_tuning/jobs", headers=auth, json=body)
        assert r.status_code in (400, 404), (extra, r.text)
        assert r.json()["error"]["param"] == param, (extra, r.json())


def test_job_lifecycle_and_listing(client, upload, auth, other_auth) -> None:
    file_id = upload().json()["id"]
    created = [_job(client, auth, file_id, metadata={"team": "a" if i % 2 else "b"}, seed=i).json() for i in range(5)]
    job = created[0]
    assert job["object"] == "fine_tuning.job" and job["status"] == "queued" and job["seed"] == 0
    assert job["method"]["type"] == "ipo" and job["result_files"] == []

    page1 = client.get("/v1/fine_tuning/jobs?limit=2", headers=auth).json()
    assert [j["id"] for j in page1["data"]] == [created[4]["id"], created[3]["id"]] and page1["has_more"]
    page3 = client.get(f"/v1/fine_tuning/jobs?limit=2&after={created[1]['id']}", headers=auth).json()
    assert [j["id"] for j in page3["data"]] == [created[0]["id"]] and not page3["has_more"]
    team_a = client.get("/v1/fine_tuning/jobs?metadata[team]=a", headers=auth).json()["data"]
    assert {j["id"] for j in team_a} == {created[1]["id"], created[3]["id"]}
    assert client.get("/v1/fine_tuning/jobs", headers=other_auth).json()["data"] == []
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=other_auth).status_code == 404

    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=auth).json()
    assert events["object"] == "list" and events["data"][0]["object"] == "fine_tuning.job.event"
    ids = [int(e["id"].removeprefix("ftevent-")) for e in events["data"]]
    assert ids == sorted(ids, reverse=True)  # newest first, like OpenAI

    r = client.post(f"/v1/fine_tuning/jobs/{job['id']}/pause", headers=auth)
    assert r.status_code == 409 and "queued" in r.json()["error"]["message"]
    assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=auth).json()["status"] == "cancelled"
    r = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=auth)
    assert r.status_code == 409 and r.json()["error"]["code"] == "invalid_state"


def test_job_creation_writes_an_outbox_row_with_the_job(client, upload, auth, settings) -> None:
    from sqlalchemy import select

    from app.models import OutboxMessage

    wake = client.app.state.ctx.wake_dispatcher
    wake.clear()
    job_id = _job(client, auth, upload().json()["id"]).json()["id"]
    assert wake.is_set()  # rung after the commit, so the dispatcher finds the row at once
    with client.app.state.ctx.sessions() as session:
        rows = session.scalars(select(OutboxMessage).where(OutboxMessage.kind == "dispatch_job")).all()
        assert any(r.payload == {"job_id": job_id} and r.sent_at is None for r in rows)


def test_idempotency_key(client, upload, auth) -> None:
    file_id = upload().json()["id"]
    headers = {**auth, "Idempotency-Key": "create-1"}
    body = {"model": "tiny-mistral", "training_file": file_id}
    first = client.post("/v1/fine_tuning/jobs", headers=headers, json=body)
    again = client.post("/v1/fine_tuning/jobs", headers=headers, json=body)
    assert first.status_code == again.status_code == 200
    assert first.json() == again.json() and again.headers.get("Idempotent-Replayed") == "true"
    other = client.post("/v1/fine_tuning/jobs", headers=headers, json={**body, "seed": 7})
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
    assert len(client.get("/v1/fine_tuning/jobs", headers=auth).json()["data"]) == 1
    # A failed request frees its key: fixing the body and retrying works.
    bad = client.post("/v1/fine_tuning/jobs", headers={**auth, "Idempotency-Key": "k2"}, json={**body, "model": "x"})
    assert bad.status_code == 400
    # Uploads honour it too.
    up1 = upload(headers={**auth, "Idempotency-Key": "up-1"})
    up2 = upload(headers={**auth, "Idempotency-Key": "up-1"})
    assert up1.json()["id"] == up2.json()["id"]


def test_health(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["checks"]["database"] == "ok"


def test_the_leaders_loop_purges_idempotency_keys_past_retention(client, upload, auth) -> None:
    from datetime import timedelta

    from sqlalchemy import select

    from app.models import IdempotencyRecord
    from app.models.base import utcnow
    from app.services import idempotency
    from app.services.dispatch import tick
    from tests.api.conftest import RecordingDoorbell

    ctx = client.app.state.ctx
    upload(headers={**auth, "Idempotency-Key": "old"})
    upload(headers={**auth, "Idempotency-Key": "fresh"})
    with ctx.sessions() as session, session.begin():
        old = session.scalars(select(IdempotencyRecord).where(IdempotencyRecord.key == "old")).one()
        old.created_at = utcnow() - idempotency.RETENTION - timedelta(minutes=1)

    assert tick(ctx.sessions, ctx.settings, RecordingDoorbell(), purge=False)["idempotency_purged"] == 0
    assert tick(ctx.sessions, ctx.settings, RecordingDoorbell(), purge=True)["idempotency_purged"] == 1
    with ctx.sessions() as session:
        keys = set(session.scalars(select(IdempotencyRecord.key)))
        assert "old" not in keys and "fresh" in keys
