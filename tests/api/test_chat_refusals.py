"""``POST /v1/chat/completions`` refusals the API gives without an inference server: the token cap, unknown
models (404 before anything is forwarded), and an unreachable inference server (503 + Retry-After)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from ipo_cli.processes import free_port
from tests.api.conftest import RecordingDoorbell

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
