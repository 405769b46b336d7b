"""A base model without a chat template trains end to end (issue 12, section 2): the API accepts the job,
says which template it will use, a real worker trains with Zephyr's template, records it in the resolved
hyperparameters and ships it in the adapter's tokenizer. The model is a copy of the tiny model's
directory with its chat template removed."""

from __future__ import annotations

import io
import json
import shutil
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from contracts.chat_templates import NAMED_TEMPLATES
from tests.conftest import fresh_database
from tests.e2e.conftest import Stack, _stack
from worker.training.demo_data import write_demo_data

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # a second live stack of its own: about a minute


@pytest.fixture(scope="module")
def base_stack(
    redis_url: str | None, queue_name: str, tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    models = tmp_path_factory.mktemp("models")
    base = models / "tiny-base"
    shutil.copytree(tiny_models_dir / "tiny-mistral", base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    with fresh_database(tmp_path_factory.mktemp("db"), "ipo_e2e_base") as database_url:
        yield from _stack(database_url, redis_url, queue_name + "-base", models, tmp_path_factory)


def test_a_base_model_job_trains_with_the_default_template(base_stack: Stack, tmp_path: Path) -> None:
    train, _ = write_demo_data(tmp_path / "data", n_train=32, n_valid=8, seed=2)
    http = httpx.Client(base_url=base_stack.url, headers=base_stack.headers, timeout=30)
    with train.open("rb") as fh:
        file_id = http.post("/v1/files", files={"file": (train.name, fh)}, data={"purpose": "fine-tune"}).json()["id"]
    body = {
        "model": "tiny-base",
        "training_file": file_id,
        "method": {"type": "ipo", "ipo": {"hyperparameters": {"max_steps": 2, "batch_size": 8}}},
    }
    r = http.post("/v1/fine_tuning/jobs", json=body, headers={"Idempotency-Key": "e2e-base-model"})
    assert r.status_code == 200, r.text
    job_id = r.json()["id"]
    deadline = time.monotonic() + 600
    while (job := http.get(f"/v1/fine_tuning/jobs/{job_id}").json())["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, job
        time.sleep(1)
    assert job["status"] == "succeeded", (job, (base_stack.logs / "worker.log").read_text()[-4000:])
    assert job["resolved_hyperparameters"]["chat_template"] == "zephyr"

    messages = [e["message"] for e in http.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=100").json()["data"]]
    said = [m for m in messages if "has no chat template (a base model)" in m]
    assert len(said) == 2, messages  # once at creation (API), once by the worker

    adapter = http.get(f"/v1/files/{job['result_files'][0]}/content")
    out = tmp_path / "adapter"
    zipfile.ZipFile(io.BytesIO(adapter.content)).extractall(out)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).chat_template == NAMED_TEMPLATES["zephyr"]
