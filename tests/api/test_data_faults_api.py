"""Job creation and upload on real-world data faults (issue 12, section 3): a chat template that refuses a
conversation is a 400 ``invalid_training_file`` naming the lines and the template's message (never a 500),
whole-file mistakes are one reason, and what is done with text rows is said in the job's events."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pytest

from tests.api.test_model_fit import write_model

# Gemma-style refusal of a system turn and Mistral-Instruct-style alternation rule (the field case's template).
REFUSING_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
SYSTEM_ROW = {
    "prompt": [
        {"role": "system", "content": "you explain tasks in simple steps"},
        {"role": "user", "content": "what part of speech is quickly"},
    ],
    "chosen": [{"role": "assistant", "content": "an adverb"}],
    "rejected": [{"role": "assistant", "content": "a noun"}],
}
PLAIN_ROW = {
    "prompt": [{"role": "user", "content": "who wrote it"}],
    "chosen": [{"role": "assistant", "content": "jane austen"}],
    "rejected": [{"role": "assistant", "content": "nobody"}],
}
DOUBLE_USER_ROW = {
    "prompt": [{"role": "user", "content": "hi"}, {"role": "user", "content": "who wrote it"}],
    "chosen": [{"role": "assistant", "content": "jane austen"}],
    "rejected": [{"role": "assistant", "content": "nobody"}],
}


def jsonl(*rows: object) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def set_template(model_dir: Path, template: str) -> None:
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = template
    config_path.write_text(json.dumps(config))


@pytest.fixture
def refusing_model(settings) -> Path:
    path = settings.resolved_models_dir / "char-model"
    write_model(path)
    set_template(path, REFUSING_TEMPLATE)
    return path


def _create(client, auth, file_id: str, hp: Mapping[str, object] | None = None, validation: str | None = None):
    body: dict[str, object] = {
        "model": "char-model",
        "training_file": file_id,
        "method": {"type": "ipo", "ipo": {"hyperparameters": hp or {}}},
    }
    if validation:
        body["validation_file"] = validation
    return client.post("/v1/fine_tuning/jobs", headers=auth, json=body)


@pytest.mark.parametrize("hp", [{}, {"max_length": 100}])
def test_a_template_refusal_is_a_400_naming_lines_and_message(client, upload, auth, refusing_model, hp) -> None:
    file_id = upload(content=jsonl(PLAIN_ROW, SYSTEM_ROW, DOUBLE_USER_ROW, SYSTEM_ROW)).json()["id"]
    r = _create(client, auth, file_id, hp)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_training_file" and err["param"] == "training_file"
    assert '"System role not supported" (lines 2, 4)' in err["message"], err["message"]
    assert '"Conversation roles must alternate user/assistant/user/assistant/..." (line 3)' in err["message"]
    assert "refuses 3 examples of training_file" in err["message"]
    assert client.get("/v1/fine_tuning/jobs", headers=auth).json()["data"] == []  # nothing queued


def test_a_template_refusal_in_the_validation_file_names_it(client, upload, auth, refusing_model) -> None:
    train = upload(content=jsonl(PLAIN_ROW)).json()["id"]
    valid = upload(content=jsonl(SYSTEM_ROW), name="valid.jsonl").json()["id"]
    r = _create(client, auth, train, validation=valid)
    assert r.status_code == 400 and r.json()["error"]["param"] == "validation_file"
    assert "of validation_file" in r.json()["error"]["message"]


def test_rows_the_template_accepts_make_a_job(client, upload, auth, refusing_model) -> None:
    file_id = upload(content=jsonl(PLAIN_ROW)).json()["id"]
    assert _create(client, auth, file_id).status_code == 200


def test_a_broken_template_is_left_to_the_worker_not_a_500(client, upload, auth, settings) -> None:
    path = settings.resolved_models_dir / "char-model"
    write_model(path)
    set_template(path, "{% for m in messages %}{{ m['content'] | nosuchfilter }}{% endfor %}")
    file_id = upload(content=jsonl(PLAIN_ROW)).json()["id"]
    r = _create(client, auth, file_id)
    assert r.status_code < 500, r.text


def test_what_is_done_with_text_rows_is_a_job_event(client, upload, auth, settings) -> None:
    write_model(settings.resolved_models_dir / "char-model")
    hh = {"prompt": "\n\nHuman: who wrote it\n\nAssistant:", "chosen": " jane", "rejected": " nobody"}
    verbatim_id = upload(content=jsonl(hh)).json()["id"]
    job = _create(client, auth, verbatim_id).json()
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=auth).json()["data"]
    said = [e["message"] for e in events if "text rows" in e["message"]]
    assert len(said) == 1 and "used verbatim" in said[0] and "Anthropic HH" in said[0], said

    # the model's own special tokens count as markup too (the API reads them from tokenizer.json)
    marked = {"prompt": "<|user|>\nwho wrote it</s>\n<|assistant|>\n", "chosen": "jane", "rejected": "nobody"}
    job = _create(client, auth, upload(content=jsonl(marked)).json()["id"]).json()
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=auth).json()["data"]
    assert any("used verbatim" in e["message"] for e in events)

    plain = {"prompt": "who wrote it", "chosen": "jane", "rejected": "nobody"}
    job = _create(client, auth, upload(content=jsonl(plain)).json()["id"]).json()
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=auth).json()["data"]
    assert any("formatted with the chat template" in e["message"] for e in events)


def test_upload_of_a_utf16_file_is_one_reason(client, upload, auth, settings) -> None:
    rows = '{"prompt": "Is ice cold?", "chosen": "Yes.", "rejected": "No."}\r\n'
    r = upload(content=b"\xff\xfe" + (rows * 2).encode("utf-16-le"))
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "error" and "UTF-16 encoded" in body["status_details"]
    assert "line" not in body["status_details"].split("UTF-16")[0]  # file-level, not per line


# --- pairs identical after truncation; max_length "auto" checked like an explicit value ---------------------

STEPS = "here is a careful step by step answer first we read the question then we check each fact so "
LONG_CONTEXT = "context the quarterly report lists revenue costs staff numbers and a long appendix " * 2


def test_pairs_identical_after_truncation_are_named_at_creation(client, upload, auth, settings) -> None:
    write_model(settings.resolved_models_dir / "char-model")
    rows = [
        {"prompt": "capital of france", "chosen": STEPS + "paris", "rejected": STEPS + "lyon"},
        {"prompt": "is ice cold", "chosen": "yes", "rejected": "no"},
        {"prompt": "what is 3 times 4", "chosen": STEPS + "12", "rejected": STEPS + "7"},
    ]
    file_id = upload(content=jsonl(*rows)).json()["id"]
    r = _create(client, auth, file_id, {"max_length": 64})
    assert r.status_code == 200, r.text
    events = client.get(f"/v1/fine_tuning/jobs/{r.json()['id']}/events", headers=auth).json()["data"]
    said = [e["message"] for e in events if "left out" in e["message"]]
    assert said == [
        "training_file: 2 pairs left out: chosen and rejected are the same tokens once cut at max_length=64, "
        "so they carry no preference (lines 1, 3)"
    ]
    assert not any("left out" in e["message"] for e in _events_of(client, auth, _create(client, auth, file_id)))


def _events_of(client, auth, response) -> list[dict[str, str]]:
    assert response.status_code == 200, response.text
    return client.get(f"/v1/fine_tuning/jobs/{response.json()['id']}/events", headers=auth).json()["data"]


def test_no_pair_left_after_truncation_is_a_400(client, upload, auth, settings) -> None:
    write_model(settings.resolved_models_dir / "char-model")
    file_id = upload(content=jsonl({"prompt": "q", "chosen": STEPS + "a", "rejected": STEPS + "b"})).json()["id"]
    r = _create(client, auth, file_id, {"max_length": 40})
    assert r.status_code == 400 and r.json()["error"]["code"] == "max_length_too_short", r.text
    assert "No pair of training_file is left to train on at max_length 40" in r.json()["error"]["message"]


def test_auto_max_length_is_resolved_and_checked_at_creation(client, upload, auth, settings) -> None:
    write_model(settings.resolved_models_dir / "char-model")  # not demo-sized: auto = 1024, capped at 128 positions
    rows = [
        {"prompt": LONG_CONTEXT + "what is listed first", "chosen": "revenue", "rejected": "names"},
        {"prompt": "is ice cold", "chosen": "yes", "rejected": "no"},
    ]
    file_id = upload(content=jsonl(*rows)).json()["id"]
    for hp in ({}, {"max_length": "auto"}):
        r = _create(client, auth, file_id, hp)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "max_length_too_short" and err["param"] == "method.ipo.hyperparameters.max_length"
        assert err["message"].startswith("max_length 128 (auto for this model) leaves no room for a reply in 1 ")
        assert "(lines 1)" in err["message"]
    assert _create(client, auth, upload(content=jsonl(rows[1])).json()["id"]).status_code == 200


def test_rows_only_the_models_special_tokens_make_verbatim_are_checked_at_creation(client, upload, auth, settings):
    write_model(settings.resolved_models_dir / "char-model")
    marked = {"prompt": "<|user|>\nwho wrote it", "chosen": "jane", "rejected": "nobody"}  # no template markers
    with_system = {"system": "be brief", "prompt": "who", "chosen": "jane", "rejected": "nobody"}
    r = upload(content=jsonl({**marked, "prompt": "<s>who"}, with_system))
    assert r.json()["status"] == "processed"  # "<s>" is markup only for a model whose special token it is
    created = _create(client, auth, r.json()["id"])
    assert created.status_code == 400 and created.json()["error"]["code"] == "invalid_training_file", created.text
    message = created.json()["error"]["message"]
    assert "cannot be used with model 'char-model'" in message and "line 1: this text row carries" in message
    assert "special token '<s>'" in message


def test_the_default_template_event_keeps_the_models_name(client, upload, auth, settings):
    from tests.unit.test_chat_templates import base_model

    base_model(settings.resolved_models_dir / "Base-7B")
    body = {"model": "Base-7B", "training_file": upload(content=jsonl(PLAIN_ROW)).json()["id"]}
    r = client.post("/v1/fine_tuning/jobs", headers=auth, json=body)
    assert r.status_code == 200, r.text
    events = client.get(f"/v1/fine_tuning/jobs/{r.json()['id']}/events", headers=auth).json()["data"]
    assert any(e["message"].startswith("Model 'Base-7B' has no chat template") for e in events)
