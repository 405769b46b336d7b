"""The inference server as its own process, driven with the official openai SDK and plain HTTP: chat
completions (streamed and not) on the base model and on loaded adapters, vLLM's adapter load/unload names,
busy answers and a client that leaves mid-stream."""

from __future__ import annotations

import time

import httpx
import pytest
from openai import NotFoundError, OpenAI
from openai.types.chat import ChatCompletionMessageParam

from tests.inference.conftest import MAX_CONCURRENT, InferenceServer, TrainedRun

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the largest planet?"}]


@pytest.fixture(scope="module")
def loaded(inference_server: InferenceServer, trained_run: TrainedRun) -> InferenceServer:
    r = inference_server.load("tuned", trained_run.adapter)
    assert r.status_code == 200, r.text
    return inference_server


def _client(server: InferenceServer) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_sdk_streams_and_not_on_base_and_adapter(loaded: InferenceServer) -> None:
    client = _client(loaded)
    models = {m.id: m for m in client.models.list()}
    assert {"tiny-mistral", "tuned"} <= set(models)
    replies = {}
    for model in ("tiny-mistral", "tuned"):
        done = client.chat.completions.create(model=model, messages=MESSAGES, seed=3, max_tokens=20)
        assert done.object == "chat.completion" and done.model == model
        choice = done.choices[0]
        assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
        assert done.usage is not None and done.usage.completion_tokens > 0
        assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
        stream = client.chat.completions.create(
            model=model, messages=MESSAGES, seed=3, max_tokens=20, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == choice.message.content  # same seed: the stream spells the same reply
        assert chunks[0].choices[0].delta.role == "assistant"
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage == done.usage
        replies[model] = text
    assert replies["tiny-mistral"] != replies["tuned"]

    two = client.chat.completions.create(model="tuned", messages=MESSAGES, seed=3, max_tokens=20, n=2)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].message.content == replies["tuned"]


def test_adapter_load_unload_and_errors(loaded: InferenceServer, trained_run: TrainedRun) -> None:
    r = loaded.load("tuned", trained_run.adapter)
    assert r.status_code == 400 and "already been loaded" in r.json()["error"]["message"]
    r = httpx.post(f"{loaded.url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/etc"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"
    assert loaded.load("ckpt2", trained_run.checkpoints[2]).status_code == 200
    r = httpx.post(f"{loaded.url}/v1/unload_lora_adapter", json={"lora_name": "ckpt2"}, timeout=60)
    assert r.status_code == 200
    with pytest.raises(NotFoundError):
        _client(loaded).chat.completions.create(model="ckpt2", messages=MESSAGES)
    r = httpx.post(f"{loaded.url}/v1/unload_lora_adapter", json={"lora_name": "ckpt2"}, timeout=60)
    assert r.status_code == 404
    r = httpx.post(
        f"{loaded.url}/v1/chat/completions",
        json={"model": "tuned", "messages": [{"role": "user", "content": "hi " * 700}]},
        timeout=60,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(
        f"{loaded.url}/v1/chat/completions", json={"model": "tuned", "messages": MESSAGES, "tools": [{}]}, timeout=60
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"


def _wait_idle(server: InferenceServer) -> dict[str, object]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        health = server.health()
        if health["active"] == 0:
            return health
        time.sleep(0.05)
    raise AssertionError(f"still busy: {server.health()}")


def test_busy_is_429_and_a_client_leaving_mid_stream_frees_its_slot(loaded: InferenceServer) -> None:
    before = _wait_idle(loaded)
    # 8 choices of 480 tokens each: a stream far longer than the probe below takes, even on a fast machine
    long = {"model": "tuned", "messages": MESSAGES, "max_tokens": 480, "min_tokens": 480, "n": 8, "stream": True}
    clients = [httpx.Client(base_url=loaded.url, timeout=60) for _ in range(MAX_CONCURRENT)]
    streams = []
    try:
        for n, c in enumerate(clients):  # fill every slot with a long reply: one generating, the rest queued
            cm = c.stream("POST", "/v1/chat/completions", json=long)
            resp = cm.__enter__()
            streams.append((cm, resp))
            assert resp.status_code == 200
            if n == 0:  # keep the line iterator referenced: a discarded one closes the response, and the
                lines = resp.iter_lines()  # server rightly takes that as the client leaving (freeing its slot)
                assert next(line for line in lines if line.startswith("data: "))
        r = httpx.post(f"{loaded.url}/v1/chat/completions", json={"model": "tuned", "messages": MESSAGES}, timeout=60)
        assert r.status_code == 429 and r.headers["Retry-After"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
    finally:
        for cm, _ in streams:  # leave mid-stream
            cm.__exit__(None, None, None)
        for c in clients:
            c.close()
    after = _wait_idle(loaded)
    assert after["cancelled"] == before["cancelled"] + MAX_CONCURRENT  # type: ignore[operator]
    r = httpx.post(
        f"{loaded.url}/v1/chat/completions", json={"model": "tuned", "messages": MESSAGES, "max_tokens": 4}, timeout=60
    )
    assert r.status_code == 200
