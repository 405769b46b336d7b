"""``integrations`` on job creation: OpenAI's ``wandb`` and the ``mlflow`` extension are stored, echoed,
written back in the job's spec and handed to the worker in the claim; unknown types, malformed blocks and
anything that looks like a credential are a 400 naming the field."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.settings import Settings
from tests.api.conftest import WORKER

WANDB = {"type": "wandb", "wandb": {"project": "align", "name": "run-1", "entity": "ml-team", "tags": ["ipo"]}}
MLFLOW = {
    "type": "mlflow",
    "mlflow": {
        "tracking_uri": "http://mlflow.internal:5000",
        "experiment_name": "ipo/zephyr",
        "run_name": "first",
        "tags": {"team": "nlp", "max_tokens": "512", "tokenizer": "zephyr"},  # not credentials
        "register_model_as": "zephyr-ipo-adapter",
    },
}


@pytest.fixture(autouse=True)
def _allow_the_test_servers(settings: Settings) -> None:
    """``IPO_MLFLOW_ALLOWED_URIS`` as an operator sets it: loopback, the internal server, a corporate domain."""
    settings.mlflow_allowed_uris = ["http://127.0.0.1", "http://mlflow.internal:5000", "https://*.corp.example/ml"]


def _create(client: TestClient, auth: dict[str, str], train: str, integrations: Any) -> Any:
    body = {"model": "tiny-mistral", "training_file": train, "integrations": integrations}
    return client.post("/v1/fine_tuning/jobs", headers=auth, json=body)


def test_integrations_are_stored_echoed_specced_and_claimed(client: TestClient, upload, auth) -> None:
    train = upload().json()["id"]
    r = _create(client, auth, train, [WANDB, MLFLOW])
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["integrations"] == [WANDB, MLFLOW]
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=auth).json()["integrations"] == [WANDB, MLFLOW]
    listed = client.get("/v1/fine_tuning/jobs", headers=auth).json()["data"]
    assert listed[0]["integrations"] == [WANDB, MLFLOW]

    spec = client.get(f"/v1/fine_tuning/jobs/{job['id']}/spec", headers=auth).json()
    assert spec["integrations"] == [WANDB, MLFLOW]

    claim = client.post(f"/internal/v1/jobs/{job['id']}/claim", headers=WORKER, json={"worker_id": "w"})
    assert claim.status_code == 200, claim.text
    assert claim.json()["spec"]["integrations"] == [WANDB, MLFLOW]


def test_optional_fields_may_be_left_out_and_no_integrations_is_an_empty_list(client: TestClient, upload, auth) -> None:
    train = upload().json()["id"]
    minimal = [{"type": "wandb", "wandb": {"project": "p"}}, {"type": "mlflow", "mlflow": {}}]
    job = _create(client, auth, train, minimal).json()
    assert job["integrations"] == minimal
    plain = client.post("/v1/fine_tuning/jobs", headers=auth, json={"model": "tiny-mistral", "training_file": train})
    assert plain.json()["integrations"] == []
    claim = client.post(f"/internal/v1/jobs/{plain.json()['id']}/claim", headers=WORKER, json={"worker_id": "w"})
    assert claim.json()["spec"]["integrations"] == []
    spec = client.get(f"/v1/fine_tuning/jobs/{plain.json()['id']}/spec", headers=auth).json()
    assert spec.get("integrations") is None  # left out of the create body it replays to


@pytest.mark.parametrize(
    ("integrations", "param", "says"),
    [
        ({"type": "wandb"}, "integrations", "list"),
        ([{"type": "comet", "comet": {}}], "integrations[0].type", "unknown integration type 'comet'"),
        ([{"wandb": {"project": "p"}}], "integrations[0].type", "unknown integration type None"),
        ([WANDB, {"type": "wandb", "wandb": {}}], "integrations[1].wandb.project", "Field required"),
        ([{"type": "wandb", "mlflow": {}}], "integrations[0].wandb", "Field required"),
        ([{"type": "wandb", "wandb": {"project": "p", "colour": "red"}}], "integrations[0].wandb.colour", "Extra"),
        ([{"type": "wandb", "wandb": {"project": "p", "tags": "ipo"}}], "integrations[0].wandb.tags", "list"),
        ([{"type": "wandb", "wandb": {"project": "p", "tags": ["x" * 65]}}], "integrations[0].wandb.tags[0]", "64"),
        ([{"type": "mlflow", "mlflow": {"tracking_uri": "file:///x"}}], "integrations[0].mlflow.tracking_uri", "http"),
        ([{"type": "mlflow", "mlflow": {"tags": {"a": 1}}}], "integrations[0].mlflow.tags.a", "string"),
        ([{"type": "mlflow", "mlflow": {"register_model_as": "a/b"}}], "integrations[0].mlflow.register_model_as", ""),
        ([MLFLOW] * 5, "integrations", "at most 4"),
    ],
)
def test_malformed_integrations_are_a_400_naming_the_field(
    client: TestClient, upload, auth, integrations: Any, param: str, says: str
) -> None:
    train = upload().json()["id"]
    r = _create(client, auth, train, integrations)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    assert says in error["message"] and error["message"].startswith(param), error
    assert client.get("/v1/fine_tuning/jobs", headers=auth).json()["data"] == []  # nothing was created


@pytest.mark.parametrize(
    ("block", "param"),
    [
        ({"type": "wandb", "wandb": {"project": "p", "api_key": "k"}}, "integrations[0].wandb.api_key"),
        ({"type": "wandb", "api_key": "k", "wandb": {"project": "p"}}, "integrations[0].api_key"),
        ({"type": "mlflow", "mlflow": {"MLFLOW_TRACKING_TOKEN": "t"}}, "integrations[0].mlflow.MLFLOW_TRACKING_TOKEN"),
        ({"type": "mlflow", "mlflow": {"tags": {"db_password": "hunter2"}}}, "integrations[0].mlflow.tags.db_password"),
        (
            {"type": "wandb", "wandb": {"project": "p", "settings": {"auth": [{"Bearer-Token": "hunter2"}]}}},
            "integrations[0].wandb.settings.auth[0].Bearer-Token",
        ),
        ({"type": "mlflow", "mlflow": {"Client_Secret": "hunter2"}}, "integrations[0].mlflow.Client_Secret"),
        ({"type": "mlflow", "mlflow": {"tracking_uri": "https://bob:hunter2@mlflow.example"}}, None),
        ({"type": "mlflow", "mlflow": {"tracking_uri": "https://:hunter2@127.0.0.1:5000"}}, None),
        ({"type": "mlflow", "mlflow": {"tracking_uri": "https://token@mlflow.example"}}, None),
        ({"type": "mlflow", "mlflow": {"tracking_uri": "https://mlflow.example/?access_token=x"}}, None),
    ],
)
def test_secrets_in_the_body_are_refused(client: TestClient, upload, auth, block: Any, param: str | None) -> None:
    train = upload().json()["id"]
    r = _create(client, auth, train, [block])
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == (param or "integrations[0].mlflow.tracking_uri"), error
    assert "worker" in error["message"] and "environment" in error["message"], error
    assert "hunter2" not in r.text


def test_the_published_schema_describes_integrations(client: TestClient) -> None:
    schema = client.get("/schemas/job-spec.v1.json").json()
    assert "integrations" in schema["properties"]
    assert {"WandbBlock", "MlflowBlock"} <= set(schema["$defs"])


@pytest.mark.parametrize(
    ("uri", "allowed"),
    [
        ("http://mlflow.internal:5000", True),
        ("http://mlflow.internal:5000/", True),
        ("http://MLflow.Internal:5000/mlflow", True),
        ("http://127.0.0.1:41234", True),  # an entry without a port allows every port
        ("https://eu.corp.example/ml", True),
        ("https://eu.corp.example/ml/tracking", True),
        ("http://mlflow.internal:5001", False),  # another port
        ("https://mlflow.internal:5000", False),  # another scheme
        ("http://169.254.169.254/latest", False),  # cloud metadata
        ("http://10.0.0.7:5000", False),
        ("https://corp.example/ml", False),  # *.corp.example is its subdomains only
        ("https://eu.corp.example/mlx", False),  # path prefixes match whole segments
        ("https://eu.corp.example/", False),
        ("http://mlflow.internal.evil.example:5000", False),
    ],
)
def test_a_tracking_uri_outside_the_allow_list_is_a_400(
    client: TestClient, upload, auth, uri: str, allowed: bool
) -> None:
    train = upload().json()["id"]
    r = _create(client, auth, train, [WANDB, {"type": "mlflow", "mlflow": {"tracking_uri": uri}}])
    if allowed:
        assert r.status_code == 200, r.text
        return
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "integrations[1].mlflow.tracking_uri" and error["code"] == "tracking_uri_not_allowed"
    assert "IPO_MLFLOW_ALLOWED_URIS" in error["message"] and uri in error["message"], error
    assert client.get("/v1/fine_tuning/jobs", headers=auth).json()["data"] == []


def test_the_default_allow_list_is_the_local_machine() -> None:
    from contracts.integrations import tracking_uri_allowed
    from worker.settings import WorkerSettings

    for allowed in (Settings().mlflow_allowed_uris, WorkerSettings().mlflow_allowed_uris):
        assert tracking_uri_allowed("http://127.0.0.1:5000", allowed)
        assert tracking_uri_allowed("http://localhost:8080/mlflow", allowed)
        assert tracking_uri_allowed("http://[::1]:5000", allowed)
        assert not tracking_uri_allowed("http://mlflow.internal:5000", allowed)
        assert not tracking_uri_allowed("https://127.0.0.1:5000", allowed)
        assert not tracking_uri_allowed("http://localhost.evil.example", allowed)


def test_the_allow_list_setting_is_parsed_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from contracts.integrations import tracking_uri_allowed

    monkeypatch.setenv("IPO_MLFLOW_ALLOWED_URIS", " https://mlflow.corp:443 , *")
    assert Settings().mlflow_allowed_uris == ["https://mlflow.corp:443", "*"]
    assert tracking_uri_allowed("http://10.1.2.3", ["*"])
    monkeypatch.setenv("IPO_MLFLOW_ALLOWED_URIS", "")
    assert Settings().mlflow_allowed_uris == []  # nothing allowed: jobs use the worker's MLFLOW_TRACKING_URI
    for bad in ("mlflow.corp", "ftp://mlflow.corp", "https://user@mlflow.corp", "https://mlflow.corp:99999"):
        monkeypatch.setenv("IPO_MLFLOW_ALLOWED_URIS", bad)
        with pytest.raises(ValidationError, match="mlflow_allowed_uris"):
            Settings()
