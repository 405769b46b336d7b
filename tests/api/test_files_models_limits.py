"""Files list/delete, models list/retrieve/delete, jobs pagination with metadata filters, rate limits."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.api.conftest import WORKER, RecordingDoorbell
from tests.api.worker_steps import claim, succeed


def _job(client: TestClient, auth: dict[str, str], file_id: str, **extra: object):
    body = {"model": "tiny-mistral", "training_file": file_id, **extra}
    return client.post("/v1/fine_tuning/jobs", headers=auth, json=body)


def _stored_blobs(settings: Settings) -> list[Path]:
    store = settings.var_dir / "storage"
    return [p for p in store.rglob("*") if p.is_file()] if store.exists() else []


def test_list_files_paginates_both_ways_and_filters_by_purpose(client, upload, auth, other_auth) -> None:
    ids = [upload(name=f"f{i}.jsonl").json()["id"] for i in range(5)]
    page = client.get("/v1/files?limit=2", headers=auth).json()
    assert page["object"] == "list" and [f["id"] for f in page["data"]] == ids[::-1][:2] and page["has_more"]
    seen, after = [], None
    while True:
        q = "/v1/files?limit=2&order=asc" + (f"&after={after}" if after else "")
        page = client.get(q, headers=auth).json()
        seen += [f["id"] for f in page["data"]]
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    assert seen == ids
    assert len(client.get("/v1/files?purpose=fine-tune", headers=auth).json()["data"]) == 5
    assert client.get("/v1/files?purpose=batch", headers=auth).json()["data"] == []
    assert client.get("/v1/files", headers=other_auth).json()["data"] == []
    r = client.get(f"/v1/files?after={ids[0]}", headers=other_auth)  # another project's cursor
    assert r.status_code == 400 and r.json()["error"]["param"] == "after"


def test_delete_file_removes_blob_and_hides_it(client, upload, auth, settings) -> None:
    file_id = upload().json()["id"]
    assert len(_stored_blobs(settings)) == 1
    r = client.delete(f"/v1/files/{file_id}", headers=auth)
    assert r.status_code == 200 and r.json() == {"id": file_id, "object": "file", "deleted": True}
    assert _stored_blobs(settings) == []
    for path in (f"/v1/files/{file_id}", f"/v1/files/{file_id}/content"):
        assert client.get(path, headers=auth).status_code == 404
    assert client.delete(f"/v1/files/{file_id}", headers=auth).status_code == 404
    assert client.get("/v1/files", headers=auth).json()["data"] == []
    r = _job(client, auth, file_id)
    assert r.status_code == 404 and r.json()["error"]["param"] == "training_file"


def test_delete_file_refused_while_an_active_job_uses_it(client, upload, auth, settings) -> None:
    train, valid = upload().json()["id"], upload(name="valid.jsonl").json()["id"]
    job = _job(client, auth, train, validation_file=valid).json()
    for file_id in (train, valid):
        r = client.delete(f"/v1/files/{file_id}", headers=auth)
        assert r.status_code == 409, r.text
        assert r.json()["error"]["code"] == "file_in_use" and job["id"] in r.json()["error"]["message"]
    claim(client, WORKER, job["id"])  # running: still refused
    assert client.delete(f"/v1/files/{train}", headers=auth).status_code == 409
    assert len(_stored_blobs(settings)) == 2
    assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=auth).status_code == 200
    assert client.delete(f"/v1/files/{train}", headers=auth).status_code == 200
    # The cancelled job still shows the file it was created with.
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=auth).json()["training_file"] == train


def test_models_list_retrieve_delete(client, upload, auth, other_auth) -> None:
    listing = client.get("/v1/models", headers=auth).json()
    assert listing["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"]) for m in listing["data"]] == [("tiny-mistral", "model", "system")]
    job = _job(client, auth, upload().json()["id"], suffix="exp1").json()
    succeed(client, WORKER, job["id"])
    done = client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=auth).json()
    model_id = done["fine_tuned_model"]
    assert done["status"] == "succeeded" and model_id == f"ft:tiny-mistral:exp1:{job['id']}"

    project = done["organization_id"]
    assert {m["id"]: m["owned_by"] for m in client.get("/v1/models", headers=auth).json()["data"]} == {
        "tiny-mistral": "system",
        model_id: project,
    }
    got = client.get(f"/v1/models/{model_id}", headers=auth)
    assert got.status_code == 200 and got.json()["id"] == model_id and got.json()["created"] > 0
    assert client.get("/v1/models/tiny-mistral", headers=auth).json()["owned_by"] == "system"
    # Another project: the model does not exist for it, not even to delete.
    assert [m["id"] for m in client.get("/v1/models", headers=other_auth).json()["data"]] == ["tiny-mistral"]
    assert client.get(f"/v1/models/{model_id}", headers=other_auth).status_code == 404
    assert client.delete(f"/v1/models/{model_id}", headers=other_auth).status_code == 404
    r = client.delete("/v1/models/tiny-mistral", headers=auth)
    assert r.status_code == 403 and r.json()["error"]["code"] == "base_model_not_deletable"

    r = client.delete(f"/v1/models/{model_id}", headers=auth)
    assert r.status_code == 200 and r.json() == {"id": model_id, "object": "model", "deleted": True}
    assert client.get(f"/v1/models/{model_id}", headers=auth).status_code == 404
    assert client.delete(f"/v1/models/{model_id}", headers=auth).status_code == 404
    assert [m["id"] for m in client.get("/v1/models", headers=auth).json()["data"]] == ["tiny-mistral"]
    r = client.get("/v1/models/ft:nope:x:ftjob-0", headers=auth)
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def test_models_describe_architecture_size_context_and_template(client, upload, auth, settings) -> None:
    """Extension fields on the model object, read from the files (the API never loads torch): a fine-tuned
    model shows its base's; a base model whose files say nothing has nulls, and a corrupt one still lists."""
    from tests.api.test_model_fit import write_model

    write_model(settings.resolved_models_dir / "char-model", positions=96)
    broken = settings.resolved_models_dir / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{")
    char = {"architecture": "mistral", "parameters": 8 * 4 * 2 + 7 * 16 + 4, "context_length": 96}
    listing = {m["id"]: m for m in client.get("/v1/models", headers=auth).json()["data"]}
    assert listing["char-model"] == {
        "id": "char-model",
        "object": "model",
        "created": listing["char-model"]["created"],
        "owned_by": "system",
        **char,
        "chat_template": True,
    }
    none = {"architecture": None, "parameters": None, "context_length": None, "chat_template": None}
    assert {k: listing["broken"][k] for k in none} == none
    # config.json {"model_type": "mistral"} only: no weights, no tokenizer
    assert {k: listing["tiny-mistral"][k] for k in none} == {**none, "architecture": "mistral", "chat_template": False}

    job = _job(client, auth, upload().json()["id"], model="char-model", suffix="d").json()
    succeed(client, WORKER, job["id"])
    model_id = client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=auth).json()["fine_tuned_model"]
    got = client.get(f"/v1/models/{model_id}", headers=auth).json()
    assert got["owned_by"] != "system" and {k: got[k] for k in [*char, "chat_template"]} == {
        **char,
        "chat_template": True,
    }


def test_jobs_metadata_filter_pages_are_full_and_chain(client, upload, auth) -> None:
    file_id = upload().json()["id"]
    jobs = []
    for i in range(9):
        meta = {"team": "a" if i % 3 == 0 else "b", "odd key.x": "y" if i % 2 else "z"}
        jobs.append(_job(client, auth, file_id, metadata=meta).json())
        if i in (2, 5):  # stay under the active-jobs limit (8) while building the list
            for j in jobs[-3:]:
                client.post(f"/v1/fine_tuning/jobs/{j['id']}/cancel", headers=auth)
    team_a = [j["id"] for j in reversed(jobs) if j["metadata"]["team"] == "a"]  # newest first: 6, 3, 0
    seen, after = [], None
    while True:
        q = "/v1/fine_tuning/jobs?limit=1&metadata[team]=a" + (f"&after={after}" if after else "")
        page = client.get(q, headers=auth).json()
        assert len(page["data"]) == 1, page
        seen.append(page["data"][0]["id"])
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert seen == team_a
    both = client.get("/v1/fine_tuning/jobs?metadata[team]=b&metadata[odd key.x]=y&limit=100", headers=auth).json()
    assert [j["id"] for j in both["data"]] == [
        j["id"] for j in reversed(jobs) if j["metadata"] == {"team": "b", "odd key.x": "y"}
    ]
    assert not both["has_more"]
    r = client.get("/v1/fine_tuning/jobs?metadata[team]=a%0d%0aX: 1", headers=auth)
    assert r.status_code == 400 and r.json()["error"]["param"] == "metadata"


def _limited_client(settings: Settings, **overrides: object) -> TestClient:
    return TestClient(create_app(settings.model_copy(update=overrides), doorbell=RecordingDoorbell()))


def test_request_rate_limit_per_key(settings, auth, other_auth) -> None:
    with _limited_client(settings, rate_limit_per_minute=3) as client:
        for _ in range(3):
            assert client.get("/v1/models", headers=auth).status_code == 200
        r = client.get("/v1/models", headers=auth)
        assert r.status_code == 429
        assert r.json()["error"]["code"] == "rate_limit_exceeded" and set(r.json()["error"]) == {
            "message",
            "type",
            "param",
            "code",
        }
        assert 1 <= int(r.headers["Retry-After"]) <= 20
        assert client.get("/v1/models", headers=other_auth).status_code == 200  # per key
        assert client.get("/healthz").status_code == 200  # health is not an API call


def test_max_active_jobs_per_project(settings, auth, good_jsonl) -> None:
    with _limited_client(settings, max_active_jobs=2) as client:
        file_id = client.post(
            "/v1/files", headers=auth, files={"file": ("t.jsonl", good_jsonl)}, data={"purpose": "fine-tune"}
        ).json()["id"]
        first, _ = _job(client, auth, file_id).json(), _job(client, auth, file_id).json()
        r = _job(client, auth, file_id)
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
        assert int(r.headers["Retry-After"]) > 0 and "2 active" in r.json()["error"]["message"]
        assert len(client.get("/v1/fine_tuning/jobs", headers=auth).json()["data"]) == 2
        client.post(f"/v1/fine_tuning/jobs/{first['id']}/cancel", headers=auth)
        assert _job(client, auth, file_id).status_code == 200


def test_openapi_declares_responses(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    public = {p: ops for p, ops in spec["paths"].items() if p.startswith("/v1/")}
    assert {"/v1/files", "/v1/files/{file_id}", "/v1/models", "/v1/models/{model_id}"} <= set(public)
    assert set(public["/v1/files/{file_id}"]) == {"get", "delete"}
    for path, ops in public.items():
        for method, op in ops.items():
            codes = set(op["responses"])
            assert {"200", "400", "401", "404", "429"} <= codes, (path, method, codes)
            ok = op["responses"]["200"]["content"]
            assert any("schema" in c for c in ok.values()), (path, method)
    for op in spec["paths"].values():
        for method_op in op.values():
            assert "200" in method_op["responses"] and method_op["responses"]["200"].get("content"), method_op
    json.dumps(spec)


def test_token_bucket_refills_continuously() -> None:
    import pytest

    from app.errors import RateLimited
    from app.services.rate_limit import RequestRateLimiter

    now = [0.0]
    limiter = RequestRateLimiter(60, clock=lambda: now[0])  # one token a second, bursts of 60
    for _ in range(60):
        limiter.check("key-a")
    with pytest.raises(RateLimited) as exc:
        limiter.check("key-a")
    assert exc.value.retry_after == 1 and exc.value.status == 429
    limiter.check("key-b")  # buckets are per key
    now[0] = 2.5
    limiter.check("key-a")
    limiter.check("key-a")
    with pytest.raises(RateLimited):
        limiter.check("key-a")
    RequestRateLimiter(0).check("key-a")  # 0 disables the limit
