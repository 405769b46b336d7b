"""Supervised jobs over the API: OpenAI's method shape, supervised files validated at upload, and the
refusals (a file of the other kind, preference-only hyperparameters, a context that fills max_length)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.test_model_fit import prompt_tokens, write_model


def sft_line(question: str, answer: str = "yes") -> bytes:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return json.dumps({"messages": messages}).encode() + b"\n"


@pytest.fixture
def model_dir(settings) -> Path:
    path = settings.resolved_models_dir / "char-model"
    write_model(path)
    return path


def _create(client: TestClient, auth: dict[str, str], file_id: str, method: dict[str, Any], **extra: object) -> Any:
    body = {"model": "char-model", "training_file": file_id, "method": method, **extra}
    return client.post("/v1/fine_tuning/jobs", headers=auth, json=body)


def test_supervised_job_is_created_with_openais_method_shape(client, upload, auth, model_dir) -> None:
    uploaded = upload(content=sft_line("ab") + sft_line("abc"))
    assert uploaded.status_code == 200 and uploaded.json()["status"] == "processed", uploaded.text
    method: dict[str, Any] = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 1}}}
    r = _create(client, auth, uploaded.json()["id"], method)
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["method"]["type"] == "supervised"
    assert job["method"]["supervised"]["hyperparameters"]["n_epochs"] == 2
    assert job["hyperparameters"]["n_epochs"] == 2 and job["hyperparameters"]["batch_size"] == 1


def test_bad_supervised_file_is_refused_at_upload_with_line_numbers(client, upload, auth, model_dir) -> None:
    tools = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}],
                        "tools": [{"type": "function", "function": {"name": "f"}}]}).encode() + b"\n"  # fmt: skip
    no_reply = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode() + b"\n"
    r = upload(content=sft_line("ab") + tools + no_reply)
    body = r.json()
    assert body["status"] == "error", body
    assert "line 2" in body["status_details"] and "tools" in body["status_details"]
    assert "line 3" in body["status_details"] and "no assistant turn" in body["status_details"]
    created = _create(client, auth, body["id"], {"type": "supervised"})
    assert created.status_code == 400
    err = created.json()["error"]
    assert err["param"] == "training_file" and "not valid supervised data" in err["message"]


def test_file_of_the_other_kind_is_a_400(client, upload, auth, model_dir, good_jsonl) -> None:
    pref = upload(content=good_jsonl).json()["id"]
    sft = upload(content=sft_line("ab")).json()["id"]
    r = _create(client, auth, pref, {"type": "supervised"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "training_file" and err["code"] == "invalid_training_file"
    assert "preference data" in err["message"] and "'supervised'" in err["message"]
    r = _create(client, auth, sft, {"type": "ipo"})
    assert r.status_code == 400 and "supervised data (format 'messages')" in r.json()["error"]["message"]
    r = _create(client, auth, sft, {"type": "supervised"}, validation_file=pref)
    assert r.status_code == 400 and r.json()["error"]["param"] == "validation_file"


@pytest.mark.parametrize("name", ["beta", "sft_weight"])
def test_preference_hyperparameters_are_refused_for_supervised(client, upload, auth, model_dir, name) -> None:
    sft = upload(content=sft_line("ab")).json()["id"]
    r = _create(client, auth, sft, {"type": "supervised", "supervised": {"hyperparameters": {name: 0.5}}})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == f"method.supervised.hyperparameters.{name}"


def test_context_that_fills_max_length_is_a_400(client, upload, auth, model_dir) -> None:
    long = "a" * 30
    sft = upload(content=sft_line("ab") + sft_line(long)).json()["id"]
    method: dict[str, Any] = {
        "type": "supervised",
        "supervised": {"hyperparameters": {"max_length": prompt_tokens(long)}},
    }
    r = _create(client, auth, sft, method)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "method.supervised.hyperparameters.max_length" and "(lines 2)" in err["message"]
    method["supervised"]["hyperparameters"]["max_length"] = prompt_tokens(long) + 1
    assert _create(client, auth, sft, method).status_code == 200
