"""Job specs as files: the published JSON Schema, a job written back as a spec, and the replay round trip."""

from __future__ import annotations

from typing import Any

import jsonschema_rs
from fastapi.testclient import TestClient

from app.schemas.job_spec import SCHEMA_PATH
from tests.api.conftest import WORKER
from tests.api.worker_steps import succeed


def _schema(client: TestClient) -> Any:
    r = client.get(SCHEMA_PATH)  # no key: a schema is documentation
    assert r.status_code == 200, r.text
    return r.json()


def test_the_schema_is_published_at_a_stable_path_and_checks_spec_files(client: TestClient) -> None:
    schema = _schema(client)
    assert SCHEMA_PATH == "/schemas/job-spec.v1.json"
    assert schema["$id"] == SCHEMA_PATH and schema["$schema"].endswith("2020-12/schema")
    assert {"model", "training_file", "method", "spec_version"} <= set(schema["properties"])
    validator = jsonschema_rs.Draft202012Validator(schema)
    good = {
        "spec_version": 1,
        "model": "tiny-mistral",
        "training_file": "file-abc",
        "method": {"type": "ipo", "ipo": {"hyperparameters": {"beta": 0.1, "max_steps": 4}}},
    }
    assert validator.is_valid(good)
    for bad in (
        {**good, "spec_version": 2},
        {**good, "surprise": 1},
        {**good, "method": {"type": "ppo"}},
        {k: v for k, v in good.items() if k != "model"},
    ):
        assert not validator.is_valid(bad), bad


def test_a_job_written_back_as_a_spec_replays_to_the_same_spec(client: TestClient, upload, auth) -> None:
    train, valid = upload().json()["id"], upload().json()["id"]
    body = {
        "model": "tiny-mistral",
        "training_file": train,
        "validation_file": valid,
        "suffix": "spec",
        "metadata": {"team": "nlp"},
        "method": {"type": "ipo", "ipo": {"hyperparameters": {"beta": 0.2}, "lora": {"r": 8}}},
        "integrations": [
            {"type": "wandb", "wandb": {"project": "align", "tags": ["spec"]}},
            {"type": "mlflow", "mlflow": {"experiment_name": "ipo", "register_model_as": "zephyr-ipo"}},
        ],
    }
    first = client.post("/v1/fine_tuning/jobs", headers=auth, json=body).json()
    spec = client.get(f"/v1/fine_tuning/jobs/{first['id']}/spec", headers=auth).json()
    assert spec["spec_version"] == 1 and spec["seed"] == first["seed"]  # the actual seed: the same run
    for key in ("model", "training_file", "validation_file", "suffix", "metadata", "integrations"):
        assert spec[key] == body[key], key
    hp = spec["method"]["ipo"]["hyperparameters"]
    assert hp["beta"] == 0.2 and "n_epochs" in hp  # what the user set, and every default spelled out
    assert spec["method"]["ipo"]["lora"]["r"] == 8
    assert jsonschema_rs.Draft202012Validator(_schema(client)).is_valid(spec)

    replay = {k: v for k, v in spec.items() if k != "spec_version"}
    second = client.post("/v1/fine_tuning/jobs", headers=auth, json=replay)
    assert second.status_code == 200, second.text
    again = client.get(f"/v1/fine_tuning/jobs/{second.json()['id']}/spec", headers=auth).json()
    assert again == spec
    assert second.json()["method"] == first["method"] and second.json()["seed"] == first["seed"]
    assert second.json()["integrations"] == first["integrations"] == body["integrations"]


def test_a_spec_of_an_unknown_job_is_a_404(client: TestClient, auth) -> None:
    r = client.get("/v1/fine_tuning/jobs/ftjob-nope/spec", headers=auth)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_a_warm_start_is_part_of_the_spec(client: TestClient, upload, auth) -> None:
    file_id = upload().json()["id"]
    parent = client.post("/v1/fine_tuning/jobs", headers=auth, json={"model": "tiny-mistral", "training_file": file_id})
    succeed(client, WORKER, parent.json()["id"])  # with a checkpoint at step 1
    checkpoints = client.get(f"/v1/fine_tuning/jobs/{parent.json()['id']}/checkpoints", headers=auth).json()
    checkpoint = checkpoints["data"][0]["id"]
    body = {"model": "tiny-mistral", "training_file": file_id, "from_checkpoint": checkpoint}
    warm = client.post("/v1/fine_tuning/jobs", headers=auth, json=body)
    assert warm.status_code == 200, warm.text
    spec = client.get(f"/v1/fine_tuning/jobs/{warm.json()['id']}/spec", headers=auth).json()
    assert spec["from_checkpoint"] == checkpoint
    replay_body = {k: v for k, v in spec.items() if k != "spec_version"}
    replay = client.post("/v1/fine_tuning/jobs", headers=auth, json=replay_body)
    assert replay.status_code == 200, replay.text
    assert client.get(f"/v1/fine_tuning/jobs/{replay.json()['id']}/spec", headers=auth).json() == spec
