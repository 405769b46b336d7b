"""Refusals that say what is wrong and leave nothing behind: Idempotency-Key header rules, strict number
types in the job body, JSON syntax errors and legacy ``hyperparameters`` named by line or field in one
line, no stored bytes after a refused or failed upload, and credentials checked before any body."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.errors import loc_to_param
from app.middleware.body_limit import INTERNAL_REPORT_BYTES
from app.models import Job
from app.services import idempotency
from app.settings import Settings
from tests.api.conftest import WORKER
from tests.api.worker_steps import claim


def _error(r: Any, status: int, param: str | None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error: dict[str, Any] = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error
    assert error["message"] and "\n" not in error["message"], error
    return error


def _blobs(settings: Settings) -> list[str]:
    store = settings.var_dir / "storage"
    return sorted(str(p.relative_to(store)) for p in store.rglob("*") if p.is_file()) if store.exists() else []


@pytest.fixture
def file_id(upload: Any) -> str:
    return str(upload().json()["id"])


# ---- Idempotency-Key --------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "why"), [("", "empty"), ("k" * 256, "256 characters"), (b"caf\xe9", "printable")])
def test_a_bad_idempotency_key_is_a_400_naming_the_header_on_every_post(
    client: TestClient, auth: dict[str, str], file_id: str, good_jsonl: bytes, value: str | bytes, why: str
) -> None:
    headers: dict[str, Any] = {**auth, "Idempotency-Key": value}  # bytes on purpose: a non-ASCII key
    job = client.post("/v1/fine_tuning/jobs", headers=auth, json={"model": "tiny-mistral", "training_file": file_id})
    posts: list[tuple[str, dict[str, Any]]] = [
        ("/v1/fine_tuning/jobs", {"json": {"model": "tiny-mistral", "training_file": file_id}}),
        ("/v1/files", {"files": {"file": ("t.jsonl", good_jsonl)}, "data": {"purpose": "fine-tune"}}),
        ("/v1/webhooks", {"json": {"url": "https://8.8.8.8/hook"}}),
        (f"/v1/fine_tuning/jobs/{job.json()['id']}/cancel", {}),
    ]
    for path, kwargs in posts:
        error = _error(client.post(path, headers=headers, **kwargs), 400, "Idempotency-Key")
        assert "Idempotency-Key" in error["message"] and why in error["message"], (path, error)
    assert client.get(f"/v1/fine_tuning/jobs/{job.json()['id']}", headers=auth).json()["status"] == "queued"


def test_an_empty_key_is_not_shared_by_unrelated_requests(
    client: TestClient, auth: dict[str, str], file_id: str
) -> None:
    body = {"model": "tiny-mistral", "training_file": file_id}
    for seed in (1, 2):  # two different bodies: neither is taken for a replay of the other
        _error(
            client.post("/v1/fine_tuning/jobs", headers={**auth, "Idempotency-Key": ""}, json=body | {"seed": seed}),
            400,
            "Idempotency-Key",
        )
    assert client.post("/v1/fine_tuning/jobs", headers=auth, json=body | {"seed": 3}).status_code == 200


# ---- strict types -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hyperparameters", "param"),
    [
        ({"beta": True}, "method.ipo.hyperparameters.beta"),
        ({"beta": "0.1"}, "method.ipo.hyperparameters.beta"),
        ({"learning_rate": False}, "method.ipo.hyperparameters.learning_rate"),
        ({"n_epochs": True}, "method.ipo.hyperparameters.n_epochs"),
        ({"n_epochs": 2.0}, "method.ipo.hyperparameters.n_epochs"),
        ({"n_epochs": "2"}, "method.ipo.hyperparameters.n_epochs"),
        ({"max_steps": 1.5}, "method.ipo.hyperparameters.max_steps"),
    ],
)
def test_numbers_are_strict(
    client: TestClient, auth: dict[str, str], file_id: str, hyperparameters: dict[str, Any], param: str
) -> None:
    body = {
        "model": "tiny-mistral",
        "training_file": file_id,
        "method": {"type": "ipo", "ipo": {"hyperparameters": hyperparameters}},
    }
    error = _error(client.post("/v1/fine_tuning/jobs", headers=auth, json=body), 400, param)
    assert error["message"].startswith(param + ": ")


def test_strict_types_elsewhere_in_the_body(client: TestClient, auth: dict[str, str], file_id: str) -> None:
    base = {"model": "tiny-mistral", "training_file": file_id}
    _error(client.post("/v1/fine_tuning/jobs", headers=auth, json=base | {"seed": True}), 400, "seed")
    _error(client.post("/v1/fine_tuning/jobs", headers=auth, json=base | {"seed": 7.0}), 400, "seed")
    lora = {"type": "dpo", "dpo": {"lora": {"r": True}}}
    _error(client.post("/v1/fine_tuning/jobs", headers=auth, json=base | {"method": lora}), 400, "method.dpo.lora.r")


def test_an_integer_is_still_a_number(client: TestClient, auth: dict[str, str], file_id: str) -> None:
    body = {
        "model": "tiny-mistral",
        "training_file": file_id,
        "method": {"type": "ipo", "ipo": {"hyperparameters": {"beta": 1, "n_epochs": 2}}},
    }
    r = client.post("/v1/fine_tuning/jobs", headers=auth, json=body)
    assert r.status_code == 200, r.text
    stored = r.json()["method"]["ipo"]["hyperparameters"]
    assert stored["beta"] == 1.0 and stored["n_epochs"] == 2 and isinstance(stored["n_epochs"], int)


def test_a_holdout_count_beside_a_validation_file_is_refused(
    client: TestClient, auth: dict[str, str], upload: Any
) -> None:
    """The validation file's prompts are the ones sampled, so holding training prompts out as well would
    silently train on less: refused, naming the field; 0 (and auto) are accepted."""
    train, valid = str(upload().json()["id"]), str(upload().json()["id"])
    base: dict[str, Any] = {"model": "tiny-mistral", "training_file": train, "validation_file": valid}
    body: dict[str, Any]
    for kind in ("ipo", "dpo"):
        body = base | {"method": {"type": kind, kind: {"samples": {"holdout": 3}}}}
        error = _error(
            client.post("/v1/fine_tuning/jobs", headers=auth, json=body), 400, f"method.{kind}.samples.holdout"
        )
        assert "validation_file" in error["message"]
    for holdout in (0, "auto"):
        body = base | {"method": {"type": "ipo", "ipo": {"samples": {"holdout": holdout}}}}
        r = client.post("/v1/fine_tuning/jobs", headers=auth, json=body)
        assert r.status_code == 200, r.text
    without_validation = {"model": "tiny-mistral", "training_file": train}
    body = without_validation | {"method": {"type": "ipo", "ipo": {"samples": {"holdout": 3}}}}
    assert client.post("/v1/fine_tuning/jobs", headers=auth, json=body).status_code == 200


# ---- error bodies name the field, header or line ------------------------------------------------------


def test_a_json_syntax_error_names_line_and_column_not_an_offset(client: TestClient, auth: dict[str, str]) -> None:
    headers = {**auth, "Content-Type": "application/json"}
    raw = '{\n  "model": "tiny-mistral",\n  "training_file": ,\n}'
    error = _error(client.post("/v1/fine_tuning/jobs", headers=headers, content=raw), 400, None)
    assert error["code"] == "invalid_json" and "line 3, column 20" in error["message"], error


@pytest.mark.parametrize(
    ("legacy", "param"),
    [
        ({"n_epochs": "many"}, "hyperparameters.n_epochs"),
        ({"n_epochs": True}, "hyperparameters.n_epochs"),
        ({"batch_size": 0}, "hyperparameters.batch_size"),
        ({"learning_rate_multiplier": -1}, "hyperparameters.learning_rate_multiplier"),
        ({"flavour": "vanilla"}, "hyperparameters.flavour"),
    ],
)
def test_a_bad_legacy_hyperparameters_block_names_its_field_in_one_line(
    client: TestClient, auth: dict[str, str], file_id: str, legacy: dict[str, Any], param: str
) -> None:
    body = {"model": "tiny-mistral", "training_file": file_id, "hyperparameters": legacy}
    error = _error(client.post("/v1/fine_tuning/jobs", headers=auth, json=body), 400, param)
    assert error["message"].startswith(param + ": ") and "validation error" not in error["message"]
    assert "For further information" not in error["message"]


@pytest.mark.parametrize(
    ("loc", "param"),
    [
        (("header", "Idempotency-Key"), "Idempotency-Key"),  # a hyphen is no union tag
        (("body", "method", "ipo", "hyperparameters", "beta", "constrained-float"), "method.ipo.hyperparameters.beta"),
        (("body", "method", "ipo", "hyperparameters", "beta", "literal['auto']"), "method.ipo.hyperparameters.beta"),
        (("body", "metadata", "my-key"), "metadata.my-key"),
        (
            ("body", "method", "ipo", "lora", "target_modules", "list[constrained-str]", 0),
            "method.ipo.lora.target_modules.0",
        ),
        (("query", "limit"), "limit"),
        (("body",), None),
    ],
)
def test_validation_locations_become_params(loc: tuple[Any, ...], param: str | None) -> None:
    assert loc_to_param(loc) == param


# ---- nothing stored without an owner ----------------------------------------------------------------


def test_an_upload_refused_for_a_reused_key_leaves_no_bytes(
    upload: Any, auth: dict[str, str], settings: Settings
) -> None:
    key = {**auth, "Idempotency-Key": "upload-once"}
    first = upload(headers=key)
    assert first.status_code == 200, first.text
    before = _blobs(settings)
    other = upload(content=b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n', headers=key)
    _error(other, 422, "Idempotency-Key")
    assert _blobs(settings) == before
    replay = upload(headers=key)  # the same file again: the first answer, and still one blob
    assert replay.json()["id"] == first.json()["id"] and _blobs(settings) == before


def test_an_upload_whose_request_fails_after_storing_leaves_no_bytes(
    client: TestClient, upload: Any, auth: dict[str, str], settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = _blobs(settings)

    def broken_record(*_: Any, **__: Any) -> None:
        raise RuntimeError("the database went away")

    monkeypatch.setattr(idempotency, "record", broken_record)
    with TestClient(client.app, raise_server_exceptions=False) as quiet:
        r = quiet.post(
            "/v1/files",
            headers={**auth, "Idempotency-Key": "will-fail"},
            files={"file": ("t.jsonl", b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n')},
            data={"purpose": "fine-tune"},
        )
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    assert _blobs(settings) == before
    assert client.get("/v1/files", headers=auth).json()["data"] == []


# ---- credentials before the body ----------------------------------------------------------------------


def test_no_route_runs_and_no_body_is_parsed_without_credentials(client: TestClient, settings: Settings) -> None:
    with client.app.state.ctx.sessions() as session:  # type: ignore[attr-defined]
        jobs_before = session.scalar(select(func.count()).select_from(Job))
    cases: list[tuple[str, dict[str, Any]]] = [
        (
            "/internal/v1/jobs/ftjob-x/claim",
            {"content": b"{" * 500_000, "headers": {"Content-Type": "application/json"}},
        ),
        (
            "/internal/v1/jobs/ftjob-x/checkpoints",
            {"files": {"file": ("c.zip", b"x" * 100_000)}, "data": {"lease_token": "t", "step": "1"}},
        ),
        ("/v1/files", {"files": {"file": ("t.jsonl", b"x" * 100_000)}, "data": {"purpose": "fine-tune"}}),
        ("/v1/fine_tuning/jobs", {"content": b"not even json"}),
    ]
    for path, kwargs in cases:
        for auth in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer ipo-sk-" + "x" * 43}):
            r = client.post(path, **(kwargs | {"headers": kwargs.get("headers", {}) | auth}))
            error = _error(r, 401, None)
            assert error["type"] == "authentication_error", (path, error)
            assert r.headers.get("connection") == "close", path  # the unread body is never drained
    assert _blobs(settings) == []
    with client.app.state.ctx.sessions() as session:  # type: ignore[attr-defined]
        assert session.scalar(select(func.count()).select_from(Job)) == jobs_before
    # The worker token opens /internal/v1, and only there.
    assert client.post("/v1/fine_tuning/jobs", headers=WORKER, json={}).status_code == 401


def test_an_oversized_internal_body_is_refused(client: TestClient, settings: Settings) -> None:
    big = b'{"worker_id": "' + b"w" * (INTERNAL_REPORT_BYTES + 10) + b'"}'
    r = client.post(
        "/internal/v1/jobs/ftjob-x/claim", headers={**WORKER, "Content-Type": "application/json"}, content=big
    )
    assert _error(r, 413, None)["code"] == "request_too_large"


def test_a_worker_report_batch_larger_than_the_public_limit_is_accepted(
    client: TestClient, auth: dict[str, str], file_id: str, settings: Settings
) -> None:
    job = client.post("/v1/fine_tuning/jobs", headers=auth, json={"model": "tiny-mistral", "training_file": file_id})
    token = claim(client, WORKER, job.json()["id"])
    events = [{"seq": i, "message": "é" * 4000, "created_at": 1} for i in range(200)]
    body = {"lease_token": token, "events": events}
    assert len(json.dumps(body, ensure_ascii=False).encode()) > settings.max_request_body_bytes
    r = client.post(f"/internal/v1/jobs/{job.json()['id']}/events", headers=WORKER, json=body)
    assert r.status_code == 200 and r.json()["accepted"] == 200, r.text[:500]


@pytest.fixture
def small_artifacts(settings: Settings, client: TestClient) -> Iterator[TestClient]:
    from app.main import create_app
    from tests.api.conftest import RecordingDoorbell

    with TestClient(
        create_app(settings.model_copy(update={"max_artifact_bytes": 1000}), doorbell=RecordingDoorbell())
    ) as c:
        yield c


def test_artifact_uploads_have_their_own_limit(small_artifacts: TestClient) -> None:
    for path in ("/internal/v1/jobs/ftjob-x/checkpoints", "/internal/v1/jobs/ftjob-x/artifacts"):
        r = small_artifacts.post(
            path,
            headers=WORKER,
            files={"file": ("c.zip", b"x" * 200_000)},
            data={"lease_token": "t", "step": "1", "name": "a"},
        )
        error = _error(r, 413, "file")
        assert "IPO_MAX_ARTIFACT_BYTES" in error["message"]
