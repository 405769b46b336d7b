"""Tenancy walk: a second project's key gets 404 on every endpoint for the first project's ids, exactly
as for ids that do not exist, and the first project's objects are unchanged afterwards."""

from __future__ import annotations

from ipaddress import ip_network

import pytest
from fastapi.testclient import TestClient

from app.settings import Settings
from tests.api.conftest import WORKER
from tests.api.worker_steps import succeed


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # The webhook below points at TEST-NET-1 (never routed, needs no DNS): not a global address, so the
    # operator's allow-list must admit it (IPO_WEBHOOK_ALLOWED_NETWORKS). Nothing is sent: no sender runs.
    return settings.model_copy(update={"webhook_allowed_networks": [ip_network("192.0.2.0/24")]})


def _ids(client: TestClient, upload, auth) -> dict[str, str]:
    file_id = upload().json()["id"]
    done = client.post("/v1/fine_tuning/jobs", headers=auth, json={"model": "tiny-mistral", "training_file": file_id})
    succeed(client, WORKER, done.json()["id"])
    live = client.post("/v1/fine_tuning/jobs", headers=auth, json={"model": "tiny-mistral", "training_file": file_id})
    finished = client.get(f"/v1/fine_tuning/jobs/{done.json()['id']}", headers=auth).json()
    webhook = client.post("/v1/webhooks", headers=auth, json={"url": "http://192.0.2.10/hook"})  # TEST-NET-1
    return {
        "file_id": file_id,
        "job_id": live.json()["id"],
        "model_id": finished["fine_tuned_model"],
        "webhook_id": webhook.json()["id"],
    }


def test_every_public_path_answers_404_to_another_project(client: TestClient, upload, auth, other_auth) -> None:
    ids = _ids(client, upload, auth)
    before = {
        "file": client.get(f"/v1/files/{ids['file_id']}", headers=auth).json(),
        "job": client.get(f"/v1/fine_tuning/jobs/{ids['job_id']}", headers=auth).json(),
    }
    spec = client.get("/openapi.json").json()
    walked = 0
    for path, ops in spec["paths"].items():
        if not path.startswith("/v1/") or "{" not in path:
            continue
        for method in ops:
            concrete = path.format(**ids)
            foreign = client.request(method.upper(), concrete, headers=other_auth)
            missing = client.request(method.upper(), concrete.replace("-", "-0000", 1), headers=other_auth)
            assert foreign.status_code == 404, (method, concrete, foreign.text)
            assert foreign.json()["error"]["code"] == "not_found"
            assert missing.status_code == 404 and set(missing.json()) == set(foreign.json()) == {"error"}
            walked += 1
    assert walked >= 14, walked
    stream = client.get(f"/v1/fine_tuning/jobs/{ids['job_id']}/events?stream=true", headers=other_auth)
    assert stream.status_code == 404 and stream.json()["error"]["code"] == "not_found"
    # Creating a job on someone else's files, or paging from someone else's cursors.
    own_file = upload(headers=other_auth).json()["id"]
    for body, param in (
        ({"model": "tiny-mistral", "training_file": ids["file_id"]}, "training_file"),
        ({"model": "tiny-mistral", "training_file": own_file, "validation_file": ids["file_id"]}, "validation_file"),
    ):
        r = client.post("/v1/fine_tuning/jobs", headers=other_auth, json=body)
        assert r.status_code == 404 and r.json()["error"]["param"] == param
    r = client.post(
        "/v1/fine_tuning/jobs", headers=other_auth, json={"model": ids["model_id"], "training_file": "file-x"}
    )
    # another project's fine-tuned model as the base of a job: 404, like one that does not exist (issue 15)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    for path in (f"/v1/fine_tuning/jobs?after={ids['job_id']}", f"/v1/files?after={ids['file_id']}"):
        foreign = client.get(path, headers=other_auth)
        missing = client.get(path.replace("-", "-0000", 1), headers=other_auth)
        assert foreign.status_code == missing.status_code and foreign.status_code in (400, 404)
    # Nothing of the first project changed (no cancel, pause, delete went through).
    assert client.get(f"/v1/files/{ids['file_id']}", headers=auth).json() == before["file"]
    assert client.get(f"/v1/fine_tuning/jobs/{ids['job_id']}", headers=auth).json() == before["job"]
    assert client.get(f"/v1/models/{ids['model_id']}", headers=auth).status_code == 200
    assert [m["id"] for m in client.get("/v1/models", headers=other_auth).json()["data"]] == ["tiny-mistral"]
    assert [f["id"] for f in client.get("/v1/files", headers=other_auth).json()["data"]] == [own_file]
    assert client.get("/v1/fine_tuning/jobs", headers=other_auth).json()["data"] == []
    assert client.get(f"/v1/webhooks/{ids['webhook_id']}", headers=auth).status_code == 200  # not deleted
