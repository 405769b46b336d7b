"""``n_gpus``: a job on several devices, from its create body to the job object, its spec, the doorbell's
queue and the worker's claim."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.services.dispatch import send_pending
from tests.api.conftest import WORKER, RecordingDoorbell


def _create(client: TestClient, auth: dict[str, str], file_id: str, **extra: Any) -> Any:
    body = {"model": "tiny-mistral", "training_file": file_id, **extra}
    return client.post("/v1/fine_tuning/jobs", headers=auth, json=body)


def test_a_job_asks_for_devices_and_keeps_them_through_spec_dispatch_and_claim(client, upload, auth) -> None:
    file_id = upload().json()["id"]
    default = _create(client, auth, file_id)
    assert default.status_code == 200, default.text
    assert default.json()["n_gpus"] == 1
    job = _create(client, auth, file_id, n_gpus=2)
    assert job.status_code == 200, job.text
    job_id = job.json()["id"]
    assert job.json()["n_gpus"] == 2
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth).json()["n_gpus"] == 2
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", headers=auth).json()["data"]
    assert any("2 devices at once" in e["message"] for e in events)

    # the spec round trip: n_gpus written back when set, the default left implicit as it was created
    spec = client.get(f"/v1/fine_tuning/jobs/{job_id}/spec", headers=auth).json()
    assert spec["n_gpus"] == 2
    assert "n_gpus" not in client.get(f"/v1/fine_tuning/jobs/{default.json()['id']}/spec", headers=auth).json()
    body = {k: v for k, v in spec.items() if k != "spec_version"}
    replay = client.post("/v1/fine_tuning/jobs", headers=auth, json=body)
    assert replay.status_code == 200 and replay.json()["n_gpus"] == 2
    assert client.get(f"/v1/fine_tuning/jobs/{replay.json()['id']}/spec", headers=auth).json() == spec

    # the doorbell goes to the queue of 2-device workers; the claim tells the worker how many to reserve
    bell = RecordingDoorbell()
    with client.app.state.ctx.sessions() as session, session.begin():
        send_pending(session, bell, client.app.state.ctx.settings)
    assert bell.devices[job_id] == 2 and bell.devices[default.json()["id"]] == 1
    claim = client.post(f"/internal/v1/jobs/{job_id}/claim", headers=WORKER, json={"worker_id": "w"})
    assert claim.status_code == 200, claim.text
    assert claim.json()["spec"]["n_gpus"] == 2


@pytest.mark.parametrize("value", [0, -1, 9, 1.5, "2", True, None])
def test_a_bad_device_count_is_a_400_naming_n_gpus(client, upload, auth, value: Any) -> None:
    file_id = upload().json()["id"]
    r = _create(client, auth, file_id, n_gpus=value)
    if value is None:  # null: the default, as OpenAI treats omitted extensions
        assert r.status_code == 200 and r.json()["n_gpus"] == 1
        return
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "n_gpus", error
    if value == 9:  # above IPO_MAX_GPUS_PER_JOB (8 by default): says the limit and the setting
        assert "at most 8" in error["message"] and "IPO_MAX_GPUS_PER_JOB" in error["message"]


def test_the_limit_is_a_setting(settings, upload, auth) -> None:
    from app.main import create_app

    with TestClient(create_app(settings.model_copy(update={"max_gpus_per_job": 2}), doorbell=RecordingDoorbell())) as c:
        file_id = c.post(
            "/v1/files", headers=auth, files={"file": ("t.jsonl", _lines())}, data={"purpose": "fine-tune"}
        ).json()["id"]
        assert _create(c, auth, file_id, n_gpus=2).status_code == 200
        r = _create(c, auth, file_id, n_gpus=3)
        assert r.status_code == 400 and "at most 2" in r.json()["error"]["message"]


def _lines() -> bytes:
    from tests.api.conftest import pref_line

    return ("\n".join(pref_line(i) for i in range(8)) + "\n").encode()
