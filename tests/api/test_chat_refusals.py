"""``POST /v1/chat/completions`` refusals the API gives without an inference server: the token cap, unknown
models (404 before anything is forwarded), and an unreachable inference server (503 + Retry-After)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from ipo_cli.processes import free_port
from tests.api.conftest import WORKER, RecordingDoorbell
from tests.api.worker_steps import succeed

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def unreachable(settings: Settings) -> Iterator[TestClient]:
    cut = settings.model_copy(update={"inference_url": f"http://127.0.0.1:{free_port()}", "chat_max_tokens": 64})
    with TestClient(create_app(cut, doorbell=RecordingDoorbell())) as c:
        yield c


def test_cap_unknown_model_and_unreachable_server(unreachable: TestClient, auth: dict[str, str]) -> None:
    r = unreachable.post(
        "/v1/chat/completions", headers=auth, json={"model": "tiny-mistral", "messages": MESSAGES, "max_tokens": 65}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert r.json()["error"]["code"] == "max_tokens_too_large"
    for model in ("nope", "ft:tiny-mistral:ipo:ftjob-x", "ft:tiny-mistral:ipo:ftjob-x:ckpt-step-3"):
        r = unreachable.post("/v1/chat/completions", headers=auth, json={"model": model, "messages": MESSAGES})
        assert r.status_code == 404 and r.json()["error"]["param"] == "model", r.text
    r = unreachable.post("/v1/chat/completions", headers=auth, json={"model": "tiny-mistral", "messages": MESSAGES})
    assert r.status_code == 503 and r.headers["Retry-After"] == "5"
    assert r.json()["error"]["code"] == "inference_unavailable"
    r = unreachable.post(
        "/v1/chat/completions", headers=auth, json={"model": "tiny-mistral", "messages": [{"role": "user"}]}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content"


def test_a_model_fine_tuned_from_a_fine_tuned_model_is_refused_with_the_reason(
    unreachable: TestClient, auth: dict[str, str], upload: Any
) -> None:
    file_id = upload().json()["id"]
    parent = unreachable.post(
        "/v1/fine_tuning/jobs", headers=auth, json={"model": "tiny-mistral", "training_file": file_id}
    )
    succeed(unreachable, WORKER, parent.json()["id"])
    parent_model = unreachable.get(f"/v1/fine_tuning/jobs/{parent.json()['id']}", headers=auth).json()[
        "fine_tuned_model"
    ]
    child = unreachable.post(
        "/v1/fine_tuning/jobs", headers=auth, json={"model": parent_model, "training_file": file_id}
    )
    assert child.status_code == 200, child.text
    succeed(unreachable, WORKER, child.json()["id"])
    child_model = unreachable.get(f"/v1/fine_tuning/jobs/{child.json()['id']}", headers=auth).json()["fine_tuned_model"]
    r = unreachable.post("/v1/chat/completions", headers=auth, json={"model": child_model, "messages": MESSAGES})
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_served", r.text
    assert r.json()["error"]["param"] == "model" and "chain" in r.json()["error"]["message"]
