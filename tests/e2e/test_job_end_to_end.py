"""From REST to adapter: a job submitted over HTTP runs a real TRL IPO training on a real Celery
worker, streams its progress over SSE, and returns an adapter that loads with PEFT."""

from __future__ import annotations

import io
import json
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import Stack
from worker.training.demo_data import write_demo_data

pytestmark = pytest.mark.e2e


def _sse(stack: Stack, job_id: str, timeout: float) -> list[dict[str, object]]:
    """Follow the job's event stream until the server closes it (the job reached a terminal state)."""
    events: list[dict[str, object]] = []
    with httpx.stream(
        "GET",
        f"{stack.url}/v1/fine_tuning/jobs/{job_id}/events?stream=true",
        headers=stack.headers,
        timeout=httpx.Timeout(10, read=timeout),
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        last_id = None
        for line in r.iter_lines():
            if line.startswith("id: "):
                last_id = line[4:]
            elif line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                assert event["id"] == last_id
                events.append(event)
    return events


def test_rest_job_trains_and_returns_a_loadable_adapter(stack: Stack, tmp_path: Path) -> None:
    train, valid = write_demo_data(tmp_path / "data", n_train=64, n_valid=16, seed=1)
    http = httpx.Client(base_url=stack.url, headers=stack.headers, timeout=30)
    ids = []
    for path in (train, valid):
        with path.open("rb") as fh:
            r = http.post("/v1/files", files={"file": (path.name, fh)}, data={"purpose": "fine-tune"})
        assert r.status_code == 200 and r.json()["status"] == "processed", r.text
        ids.append(r.json()["id"])
    body = {
        "model": "tiny-mistral",
        "training_file": ids[0],
        "validation_file": ids[1],
        "suffix": "e2e",
        "seed": 3,
        "method": {
            "type": "ipo",
            "ipo": {"hyperparameters": {"max_steps": 12, "batch_size": 8, "beta": 0.1, "checkpoint_every": 6}},
        },
    }
    started = time.monotonic()
    job = http.post("/v1/fine_tuning/jobs", json=body, headers={"Idempotency-Key": "e2e-create"}).json()
    assert job["status"] == "queued", job

    events = _sse(stack, job["id"], timeout=600)
    final = http.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    assert final["status"] == "succeeded", (final, (stack.logs / "worker.log").read_text()[-4000:])
    print(f"e2e job took {time.monotonic() - started:.1f}s")

    metrics = [e["data"] for e in events if e["type"] == "metrics"]
    steps = [m["step"] for m in metrics if "train_loss" in m]  # type: ignore[index,operator]
    assert steps and steps == sorted(set(steps)) and max(steps) == 12
    assert all(m["total_steps"] == 12 and isinstance(m["train_loss"], float) for m in metrics if "train_loss" in m)  # type: ignore[index,operator]
    ids_seen = [int(str(e["id"]).removeprefix("ftevent-")) for e in events]
    assert ids_seen == sorted(ids_seen) and len(ids_seen) == len(set(ids_seen))
    assert final["resolved_hyperparameters"]["beta"] == 0.1
    assert final["fine_tuned_model"].startswith("ft:tiny-mistral:e2e:") and final["trained_tokens"] > 0

    # Replay from the middle of the stream with Last-Event-ID: only later events come back.
    middle = events[len(events) // 2]["id"]
    with httpx.stream(
        "GET",
        f"{stack.url}/v1/fine_tuning/jobs/{job['id']}/events",
        headers={**stack.headers, "Accept": "text/event-stream", "Last-Event-ID": str(middle)},
        timeout=30,
    ) as r:
        replayed = [
            json.loads(line[6:])["id"]
            for line in r.iter_lines()
            if line.startswith("data: ") and line != "data: [DONE]"
        ]
    assert replayed == [e["id"] for e in events[len(events) // 2 + 1 :]]

    adapter_zip = http.get(f"/v1/files/{final['result_files'][0]}/content")
    assert adapter_zip.status_code == 200
    out = tmp_path / "adapter"
    zipfile.ZipFile(io.BytesIO(adapter_zip.content)).extractall(out)
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(stack.models_dir / "tiny-mistral")
    model = PeftModel.from_pretrained(base, out)
    lora = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert lora, "adapter has no LoRA weights"

    checkpoints = http.get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=100").json()["data"]
    assert any("Checkpoint saved at step" in e["message"] for e in checkpoints)
