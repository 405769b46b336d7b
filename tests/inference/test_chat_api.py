"""``POST /v1/chat/completions`` on the API, forwarded to a live inference server: the official openai SDK on
the base model, a fine-tuned model and checkpoints (of a finished and of a running job), tenancy, the bad
inputs of the issue, and Idempotency-Key."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from tests.inference.conftest import CHAT_MAX_TOKENS, MAX_CONCURRENT, InferenceServer, LiveApi, Project

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the capital of Brazil?"}]


def test_sdk_on_base_fine_tuned_and_checkpoints(project: Project, live_api: LiveApi) -> None:
    client = project.client(live_api)
    replies: dict[str, str] = {}
    models = ["tiny-mistral", project.fine_tuned_model, project.checkpoint, project.running_checkpoint]
    for model in models + models:  # twice round: 4 adapters on a server that keeps 2 (evicted ones reload)
        done = client.chat.completions.create(
            model=model, messages=MESSAGES, seed=11, temperature=0.9, max_completion_tokens=16,
        )  # fmt: skip
        assert done.model == model and done.object == "chat.completion"
        text = done.choices[0].message.content or ""
        assert replies.setdefault(model, text) == text  # same seed, same reply, loaded or reloaded
        assert done.usage is not None and 0 < done.usage.completion_tokens <= 16
    assert replies["tiny-mistral"] != replies[project.fine_tuned_model]

    chunks = list(
        client.chat.completions.create(
            model=project.fine_tuned_model, messages=MESSAGES, seed=11, temperature=0.9, max_tokens=16, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert all(c.model == project.fine_tuned_model for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == replies[project.fine_tuned_model]
    assert chunks[-1].usage is not None and chunks[-1].choices == []


def test_other_projects_and_unknown_models_are_404(project: Project, live_api: LiveApi) -> None:
    other = OpenAI(base_url=f"{live_api.url}/v1", api_key=live_api.new_key("chat-b"), max_retries=0)
    for model in [project.fine_tuned_model, project.checkpoint, project.running_checkpoint, "nope",
                  project.checkpoint.replace("ckpt-step-2", "ckpt-step-3")]:  # fmt: skip
        with pytest.raises(openai.NotFoundError) as err:
            other.chat.completions.create(model=model, messages=MESSAGES)
        assert err.value.body["param"] == "model"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        project.client(live_api).chat.completions.create(model="ft:tiny-mistral:ipo:ftjob-nope", messages=MESSAGES)


def _post(api: LiveApi, project: Project, body: dict[str, object], **headers: str) -> httpx.Response:
    return httpx.post(
        f"{api.url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {project.key}", **headers},
        timeout=60,
    )


def test_bad_inputs_name_the_field(project: Project, live_api: LiveApi) -> None:
    base: dict[str, object] = {"model": project.fine_tuned_model, "messages": MESSAGES}
    cases: list[tuple[dict[str, object], str]] = [
        ({"max_tokens": CHAT_MAX_TOKENS + 1}, "max_tokens"),
        ({"max_completion_tokens": CHAT_MAX_TOKENS + 1}, "max_completion_tokens"),
        ({"messages": [{"role": "user", "content": "moon " * 700}]}, "messages"),
        ({"max_tokens": CHAT_MAX_TOKENS}, "max_tokens"),  # under the cap, but past the 512-token context
        ({"temperature": 3}, "temperature"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
        ({"logprobs": True}, "logprobs"),
        ({"functions": []}, "functions"),
    ]
    for extra, param in cases:
        r = _post(live_api, project, {**base, **extra})
        assert r.status_code == 400, (extra, r.text)
        assert r.json()["error"]["param"] == param, (extra, r.text)


def _wait_idle(server: InferenceServer) -> dict[str, object]:
    deadline = time.monotonic() + 60
    while (health := server.health())["active"] != 0:
        assert time.monotonic() < deadline, health
        time.sleep(0.05)
    return health


def test_busy_server_is_429_with_retry_after_and_leaving_frees_the_slot(
    project: Project, live_api: LiveApi, inference_server: InferenceServer
) -> None:
    before = _wait_idle(inference_server)
    long = {
        "model": project.fine_tuned_model,
        "messages": MESSAGES,
        "max_tokens": 480,
        "min_tokens": 480,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {project.key}"}
    clients = [httpx.Client(base_url=live_api.url, headers=headers, timeout=60) for _ in range(MAX_CONCURRENT)]
    streams = []
    try:
        for n, c in enumerate(clients):  # one reply generating, the others queued behind it
            cm = c.stream("POST", "/v1/chat/completions", json=long)
            resp = cm.__enter__()
            streams.append(cm)
            assert resp.status_code == 200
            if n == 0:  # generating: its role chunk and first words arrive
                lines = resp.iter_lines()
                seen = [line for _, line in zip(range(3), (x for x in lines if x.startswith("data: ")), strict=False)]
                assert len(seen) == 3 and all('"error"' not in line for line in seen), seen
        r = _post(live_api, project, {"model": "tiny-mistral", "messages": MESSAGES, "max_tokens": 4})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error"
    finally:
        for cm in streams:  # the clients leave mid-stream
            cm.__exit__(None, None, None)
        for c in clients:
            c.close()
    after = _wait_idle(inference_server)
    assert after["cancelled"] == before["cancelled"] + MAX_CONCURRENT  # type: ignore[operator]


def test_idempotency_key_replays_the_first_reply(project: Project, live_api: LiveApi) -> None:
    body = {"model": project.fine_tuned_model, "messages": MESSAGES, "max_tokens": 12, "temperature": 1.0}
    first = _post(live_api, project, body, **{"Idempotency-Key": "chat-1"})
    again = _post(live_api, project, body, **{"Idempotency-Key": "chat-1"})
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json() and again.headers["Idempotent-Replayed"] == "true"
    other = _post(live_api, project, {**body, "max_tokens": 13}, **{"Idempotency-Key": "chat-1"})
    assert other.status_code == 422

    stream = {**body, "stream": True}
    a = _post(live_api, project, stream, **{"Idempotency-Key": "chat-2"})
    b = _post(live_api, project, stream, **{"Idempotency-Key": "chat-2"})
    assert a.status_code == b.status_code == 200 and b.headers["Idempotent-Replayed"] == "true"
    assert a.text.endswith("data: [DONE]\n\n") and b.text.endswith("data: [DONE]\n\n")
    assert _chunks(a.text) == _chunks(b.text) and len(_chunks(a.text)) >= 3  # the same chunks (key order aside)


def _chunks(sse: str) -> list[object]:
    return [json.loads(line[6:]) for line in sse.splitlines() if line.startswith("data: {")]
