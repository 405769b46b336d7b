"""A job's ``method.<type>.chat_template`` at creation (issue 12, section 2): a base model without a template
gets Zephyr's by default, said in an event, and every check runs with it; named and Jinja templates are
accepted, anything else is a 400 naming the field; a named template that refuses a row is a 400 too."""

from __future__ import annotations

import json

import pytest

from tests.api.test_data_faults_api import PLAIN_ROW, SYSTEM_ROW, jsonl
from tests.unit.test_chat_templates import base_model


@pytest.fixture
def base(settings):
    return base_model(settings.resolved_models_dir / "base-model")


def _create(client, auth, file_id: str, chat_template: object = None, kind: str = "ipo", **hp: object):
    params: dict[str, object] = {"hyperparameters": hp}
    if chat_template is not None:
        params["chat_template"] = chat_template
    body = {"model": "base-model", "training_file": file_id, "method": {"type": kind, kind: params}}
    return client.post("/v1/fine_tuning/jobs", headers=auth, json=body)


def _events(client, auth, job_id: str) -> list[str]:
    return [e["message"] for e in client.get(f"/v1/fine_tuning/jobs/{job_id}/events", headers=auth).json()["data"]]


def test_a_base_model_gets_the_zephyr_template_and_says_so(client, upload, auth, base) -> None:
    r = _create(client, auth, upload(content=jsonl(PLAIN_ROW, SYSTEM_ROW)).json()["id"])
    assert r.status_code == 200, r.text
    said = [m for m in _events(client, auth, r.json()["id"]) if "chat template" in m]
    assert said == [
        "Model 'base-model' has no chat template (a base model): conversations are formatted with the zephyr "
        "template, the recipe's default; set method.<type>.chat_template to choose another"
    ]
    assert r.json()["method"]["ipo"]["chat_template"] == "auto"


def test_checks_run_with_the_default_template_on_a_base_model(client, upload, auth, base) -> None:
    long_row = {**PLAIN_ROW, "prompt": [{"role": "user", "content": "a" * 130}]}
    r = _create(client, auth, upload(content=jsonl(PLAIN_ROW, long_row)).json()["id"])
    assert r.status_code == 400 and r.json()["error"]["code"] == "max_length_too_short", r.text  # auto: 128 positions


@pytest.mark.parametrize("name", ["zephyr", "chatml", "llama-3", "mistral-instruct"])
def test_named_templates_are_accepted_and_said(client, upload, auth, base, name: str) -> None:
    r = _create(client, auth, upload(content=jsonl(PLAIN_ROW)).json()["id"], chat_template=name, kind="dpo")
    assert r.status_code == 200, r.text
    assert r.json()["method"]["dpo"]["chat_template"] == name
    assert f"Conversations are formatted with the {name} chat template (method.<type>.chat_template)" in _events(
        client, auth, r.json()["id"]
    )


def test_a_jinja_template_is_accepted(client, upload, auth, base) -> None:
    jinja = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
    r = _create(client, auth, upload(content=jsonl(PLAIN_ROW)).json()["id"], chat_template=jinja)
    assert r.status_code == 200, r.text
    assert any("custom chat template" in m for m in _events(client, auth, r.json()["id"]))


@pytest.mark.parametrize(
    ("value", "status", "needle"),
    [
        ("vicuna", 400, "neither a named template"),
        ("{% for m in messages %}", 400, "cannot render a user/assistant conversation"),
        ("", 400, "chat_template"),
        (7, 400, "chat_template"),
    ],
)
def test_an_unusable_chat_template_is_a_400_naming_the_field(client, upload, auth, base, value, status, needle) -> None:
    r = _create(client, auth, upload(content=jsonl(PLAIN_ROW)).json()["id"], chat_template=value)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == "method.ipo.chat_template" and needle in err["message"], err


def test_a_named_template_that_refuses_rows_is_a_400(client, upload, auth, base) -> None:
    r = _create(
        client, auth, upload(content=jsonl(PLAIN_ROW, SYSTEM_ROW)).json()["id"], chat_template="mistral-instruct"
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_training_file", r.text
    assert (
        "Conversation roles must alternate" in r.json()["error"]["message"]
        and "(line 2)" in r.json()["error"]["message"]
    )


def test_the_model_keeps_its_own_template_without_an_event(client, upload, auth, settings) -> None:
    from tests.api.test_model_fit import write_model

    write_model(settings.resolved_models_dir / "base-model")
    r = _create(client, auth, upload(content=jsonl(PLAIN_ROW)).json()["id"])
    assert r.status_code == 200 and not any("chat template" in m for m in _events(client, auth, r.json()["id"]))
    assert json.dumps(r.json()["method"]).count("auto") >= 1


def test_the_chat_template_round_trips_through_the_job_spec(client, upload, auth, base):
    r = _create(client, auth, upload(content=jsonl(PLAIN_ROW)).json()["id"], chat_template="llama-3")
    assert r.status_code == 200, r.text
    spec = client.get(f"/v1/fine_tuning/jobs/{r.json()['id']}/spec", headers=auth)
    assert spec.status_code == 200, spec.text
    assert spec.json()["method"]["ipo"]["chat_template"] == "llama-3"
    schema = client.get("/schemas/job-spec.v1.json").json()
    assert "chat_template" in json.dumps(schema)


LOOPS_FOR_EVER = (
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    "{% for m in messages %}{{ m['content'] }}{% endfor %}"
)
GROWS_FOR_EVER = (
    "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
    "{% for m in messages %}{{ m['content'] }}{% endfor %}"
)


def test_a_jinja_template_that_never_ends_is_stopped_not_run_in_the_api(client, upload, auth, base, monkeypatch):
    from app.services import prompt_lengths

    monkeypatch.setattr(prompt_lengths, "UNTRUSTED_TIMEOUT_SECONDS", 3.0)
    file_id = upload(content=jsonl(PLAIN_ROW)).json()["id"]
    r = _create(client, auth, file_id, chat_template=LOOPS_FOR_EVER)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "method.ipo.chat_template" and err["code"] == "invalid_chat_template"
    assert "took more than 3s" in err["message"]


def test_a_jinja_template_that_eats_memory_is_refused(client, upload, auth, base):
    r = _create(client, auth, upload(content=jsonl(PLAIN_ROW)).json()["id"], chat_template=GROWS_FOR_EVER)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_chat_template", r.text
    assert "MemoryError" in r.json()["error"]["message"] or "memory" in r.json()["error"]["message"]


def test_a_jinja_template_that_refuses_rows_in_the_child_is_named_by_line(client, upload, auth, base):
    refusing = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system here') }}{% endif %}"
        "{{ m['content'] + eos_token }}{% endfor %}"
    )
    r = _create(client, auth, upload(content=jsonl(PLAIN_ROW, SYSTEM_ROW)).json()["id"], chat_template=refusing)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_training_file", r.text
    assert '"no system here" (line 2)' in r.json()["error"]["message"]
