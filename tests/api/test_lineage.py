"""A fine-tuned model (or checkpoint) as the ``model`` of a new job: resolution, tenancy, refusals, the lineage
in the job object and the adapter chain a worker gets in its claim."""

from __future__ import annotations

import shutil
from typing import Any

from fastapi.testclient import TestClient

from app.settings import Settings
from tests.api.conftest import WORKER
from tests.api.worker_steps import add_checkpoint, claim, succeed


def _job(client: TestClient, auth: dict[str, str], file_id: str, model: str = "tiny-mistral", **extra: Any) -> Any:
    body = {"model": model, "training_file": file_id, **extra}
    return client.post("/v1/fine_tuning/jobs", headers=auth, json=body)


def _finished_parent(client: TestClient, auth: dict[str, str], file_id: str) -> dict[str, Any]:
    job = _job(client, auth, file_id).json()
    succeed(client, WORKER, job["id"])
    return dict(client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=auth).json())


def test_a_fine_tuned_model_starts_a_job_with_its_adapter_chain(client, upload, auth) -> None:
    file_id = upload().json()["id"]
    parent = _finished_parent(client, auth, file_id)
    assert parent["lineage"] == {
        "base_model": "tiny-mistral",
        "parent_job_id": None,
        "parent_checkpoint_id": None,
        "from_checkpoint": None,
        "optimizer_state": None,
    }

    r = _job(client, auth, file_id, model=parent["fine_tuned_model"])
    assert r.status_code == 200, r.text
    child = r.json()
    assert child["model"] == parent["fine_tuned_model"]  # as sent, like OpenAI
    assert child["lineage"] == {
        "base_model": "tiny-mistral",
        "parent_job_id": parent["id"],
        "parent_checkpoint_id": None,
        "from_checkpoint": None,
        "optimizer_state": None,
    }
    events = client.get(f"/v1/fine_tuning/jobs/{child['id']}/events", headers=auth).json()["data"]
    assert any(f"job {parent['id']}" in e["message"] and "reference" in e["message"] for e in events)

    # a third generation: the claim carries the whole chain, root first, and the base model's name
    succeed(client, WORKER, child["id"])
    child = client.get(f"/v1/fine_tuning/jobs/{child['id']}", headers=auth).json()
    assert child["fine_tuned_model"].startswith("ft:tiny-mistral:")  # named after the root base model
    grandchild = _job(client, auth, file_id, model=child["fine_tuned_model"]).json()
    r = client.post(f"/internal/v1/jobs/{grandchild['id']}/claim", headers=WORKER, json={"worker_id": "w"})
    spec = r.json()["spec"]
    assert spec["model"] == "tiny-mistral"
    assert [p["job_id"] for p in spec["parents"]] == [parent["id"], child["id"]]
    assert spec["parents"][0]["download_path"] == f"/internal/v1/files/{parent['result_files'][0]}/content"
    adapter = client.get(spec["parents"][1]["download_path"], headers=WORKER)
    assert adapter.status_code == 200 and adapter.content == b"adapter-bytes"


def test_a_checkpoint_of_a_finished_job_by_id_or_by_name(client, upload, auth) -> None:
    file_id = upload().json()["id"]
    parent = _finished_parent(client, auth, file_id)
    (ckpt,) = client.get(f"/v1/fine_tuning/jobs/{parent['id']}/checkpoints", headers=auth).json()["data"]
    for model in (ckpt["id"], ckpt["fine_tuned_model_checkpoint"]):
        r = _job(client, auth, file_id, model=model)
        assert r.status_code == 200, r.text
        assert r.json()["lineage"]["parent_checkpoint_id"] == ckpt["id"]
    spec = client.post(f"/internal/v1/jobs/{r.json()['id']}/claim", headers=WORKER, json={"worker_id": "w"}).json()
    (only,) = spec["spec"]["parents"]
    assert only == {
        "job_id": parent["id"],
        "checkpoint_id": ckpt["id"],
        "download_path": f"/internal/v1/files/{ckpt['file_id']}/content",
    }


def test_another_projects_model_or_checkpoint_is_a_404(client, upload, auth, other_auth) -> None:
    file_id = upload().json()["id"]
    parent = _finished_parent(client, auth, file_id)
    (ckpt,) = client.get(f"/v1/fine_tuning/jobs/{parent['id']}/checkpoints", headers=auth).json()["data"]
    theirs = upload(headers=other_auth).json()["id"]
    for model in (parent["fine_tuned_model"], ckpt["id"], ckpt["fine_tuned_model_checkpoint"], "ft:tiny-mistral:x:y"):
        r = _job(client, other_auth, theirs, model=model)
        assert r.status_code == 404, (model, r.text)
        err = r.json()["error"]
        assert err["param"] == "model" and err["code"] == "model_not_found"


def test_a_checkpoint_of_a_running_job_is_a_400(client, upload, auth) -> None:
    file_id = upload().json()["id"]
    running = _job(client, auth, file_id).json()
    token = claim(client, WORKER, running["id"])
    ckpt_id = add_checkpoint(client, WORKER, running["id"], token, 3)
    r = _job(client, auth, file_id, model=ckpt_id)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "model" and err["code"] == "parent_not_finished" and "running" in err["message"]


def test_a_parent_whose_base_model_is_gone_is_a_400(client, upload, auth, settings: Settings) -> None:
    file_id = upload().json()["id"]
    parent = _finished_parent(client, auth, file_id)
    shutil.rmtree(settings.resolved_models_dir / "tiny-mistral")
    r = _job(client, auth, file_id, model=parent["fine_tuned_model"])
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "incompatible_base_model" and "'tiny-mistral'" in err["message"]


def test_an_unknown_base_model_still_lists_what_is_available(client, upload, auth) -> None:
    r = _job(client, auth, upload().json()["id"], model="gpt-4o")
    assert r.status_code == 400 and "tiny-mistral" in r.json()["error"]["message"]


def test_warm_start_from_a_checkpoint_of_the_same_method_and_model(client, upload, auth, other_auth) -> None:
    file_id = upload().json()["id"]
    parent = _finished_parent(client, auth, file_id)
    (ckpt,) = client.get(f"/v1/fine_tuning/jobs/{parent['id']}/checkpoints", headers=auth).json()["data"]
    r = _job(client, auth, file_id, from_checkpoint=ckpt["fine_tuned_model_checkpoint"])
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["lineage"]["from_checkpoint"] == ckpt["id"] and job["lineage"]["optimizer_state"] == "fresh"
    assert job["lineage"]["parent_job_id"] is None  # the same starting model (and reference) as the parent
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=auth).json()["data"]
    assert any("Warm start" in e["message"] and "not a resume" in e["message"] for e in events)
    spec = client.post(f"/internal/v1/jobs/{job['id']}/claim", headers=WORKER, json={"worker_id": "w"}).json()["spec"]
    assert spec["warm_start"]["checkpoint_id"] == ckpt["id"] and spec["parents"] == []
    assert spec["warm_start"]["download_path"] == f"/internal/v1/files/{ckpt['file_id']}/content"

    other = _job(client, auth, file_id, from_checkpoint=ckpt["id"], method={"type": "dpo"})
    assert other.status_code == 400 and other.json()["error"]["code"] == "incompatible_checkpoint"
    assert other.json()["error"]["param"] == "from_checkpoint"
    sft = upload(content=b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    r = _job(client, auth, sft.json()["id"], from_checkpoint=ckpt["id"], method={"type": "supervised"})
    assert r.status_code == 400 and "a warm start continues the same method" in r.json()["error"]["message"]
    theirs = upload(headers=other_auth).json()["id"]
    r = _job(client, other_auth, theirs, from_checkpoint=ckpt["id"])
    assert r.status_code == 404 and r.json()["error"]["param"] == "from_checkpoint"


def test_warm_start_from_a_running_job_is_a_400(client, upload, auth) -> None:
    file_id = upload().json()["id"]
    running = _job(client, auth, file_id).json()
    token = claim(client, WORKER, running["id"])
    ckpt_id = add_checkpoint(client, WORKER, running["id"], token, 2)
    r = _job(client, auth, file_id, from_checkpoint=ckpt_id)
    assert r.status_code == 400 and r.json()["error"]["code"] == "parent_not_finished"


def test_dashboard_and_cli_show_where_a_job_started(client, upload, auth) -> None:
    from ipo_cli.client_commands import _lineage_text
    from tests.dashboard.test_dashboard_routes import SAME_ORIGIN, key_of

    file_id = upload().json()["id"]
    parent = _finished_parent(client, auth, file_id)
    child = _job(client, auth, file_id, model=parent["fine_tuned_model"]).json()
    login = client.post("/login", data={"api_key": key_of(auth)}, headers=SAME_ORIGIN, follow_redirects=False)
    assert login.status_code == 303
    page = client.get(f"/jobs/{child['id']}").text
    assert "Started from" in page and f'href="/jobs/{parent["id"]}"' in page and "on base tiny-mistral" in page
    assert "Started from" not in client.get(f"/jobs/{parent['id']}").text
    assert _lineage_text(child["lineage"]) == f"  from {parent['id']} on tiny-mistral"
    assert _lineage_text(parent["lineage"]) == ""
