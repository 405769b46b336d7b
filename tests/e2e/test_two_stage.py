"""The Zephyr recipe end to end through the unchanged openai SDK against a live server and a real worker:
a supervised job on the tiny model, then an IPO job whose ``model`` is that job's ``fine_tuned_model``
(the reference is the SFT model). The final model must beat both the base and the SFT model on the demo's
behaviour check (``worker.training.evaluate``: sampled replies on held-out prompts judged by
``demo_data.judge``)."""

from __future__ import annotations

import io
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Stack
from worker.training.demo_data import write_demo_data
from worker.training.sft_demo_data import write_sft_demo_data

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1800)]  # two trainings, three evaluations


def _wait(client: Any, job_id: str, timeout: float = 900) -> Any:
    deadline = time.monotonic() + timeout
    while (job := client.fine_tuning.jobs.retrieve(job_id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, job
        time.sleep(1)
    return job


def _adapter(client: Any, job: Any, out: Path) -> Path:
    data = client.files.content(job.result_files[0]).read()
    zipfile.ZipFile(io.BytesIO(data)).extractall(out)
    return out


def test_supervised_then_ipo_on_its_fine_tuned_model(stack: Stack, tmp_path: Path) -> None:
    from openai import OpenAI
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from worker.training.evaluate import evaluate_model, load_pairs

    client = OpenAI(base_url=stack.url + "/v1", api_key=stack.api_key, max_retries=5)
    # stage 1: the dialogue format (a system prompt), with sum and product replies in equal measure, so
    # imitation alone does not pick the preferred behaviour; stage 2: the preference does
    sft_train, _ = write_sft_demo_data(tmp_path / "sft", n_train=128, n_valid=16, seed=4, correct_fraction=0.5)
    pref_train, pref_valid = write_demo_data(tmp_path / "pref", n_valid=24, seed=0)
    sft_file = client.files.create(file=sft_train.open("rb"), purpose="fine-tune")
    sft = client.fine_tuning.jobs.create(
        model="tiny-mistral",
        training_file=sft_file.id,
        suffix="sft",
        seed=1,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 8}}},
        extra_headers={"Idempotency-Key": "two-stage-sft"},
    )
    sft = _wait(client, sft.id)
    assert sft.status == "succeeded", (sft, (stack.logs / "worker.log").read_text()[-4000:])
    assert sft.method.type == "supervised" and sft.fine_tuned_model.startswith("ft:tiny-mistral:sft:")

    pref_file = client.files.create(file=pref_train.open("rb"), purpose="fine-tune")
    ipo = client.fine_tuning.jobs.create(
        model=sft.fine_tuned_model,
        training_file=pref_file.id,
        suffix="ipo",
        seed=1,
        method={"type": "ipo", "ipo": {"hyperparameters": {}}},  # type: ignore[arg-type]  # the tiny preset, as the demo
        extra_headers={"Idempotency-Key": "two-stage-ipo"},
    )
    assert ipo.model == sft.fine_tuned_model
    ipo = _wait(client, ipo.id)
    assert ipo.status == "succeeded", (ipo, (stack.logs / "worker.log").read_text()[-4000:])
    lineage = (ipo.model_extra or {})["lineage"]  # the extension field, as the unchanged SDK exposes it
    assert lineage["base_model"] == "tiny-mistral" and lineage["parent_job_id"] == sft.id
    assert ipo.fine_tuned_model.startswith("ft:tiny-mistral:ipo:")
    events = [e.message for e in client.fine_tuning.jobs.list_events(ipo.id, limit=100)]
    assert any(f"job {sft.id}" in m and "reference" in m for m in events), events

    sft_adapter = _adapter(client, sft, tmp_path / "sft-adapter")
    ipo_adapter = _adapter(client, ipo, tmp_path / "ipo-adapter")
    model_dir = stack.models_dir / "tiny-mistral"
    tokenizer = AutoTokenizer.from_pretrained(str(ipo_adapter))
    pairs = load_pairs(pref_valid)

    def base() -> Any:
        return AutoModelForCausalLM.from_pretrained(str(model_dir))

    sft_model = PeftModel.from_pretrained(base(), str(sft_adapter)).merge_and_unload()
    final = PeftModel.from_pretrained(
        PeftModel.from_pretrained(base(), str(sft_adapter)).merge_and_unload(), str(ipo_adapter)
    )
    models: list[tuple[str, Any]] = [("base", base()), ("sft", sft_model), ("sft+ipo", final)]
    results = {name: evaluate_model(model, tokenizer, pairs, samples=4, seed=0) for name, model in models}
    rates = {name: (r.behaviour_rate or 0.0, r.preference_accuracy) for name, r in results.items()}
    print("behaviour rate, preference accuracy:", rates)
    assert rates["sft+ipo"][0] > max(rates["base"][0], rates["sft"][0]) + 0.2
    assert rates["sft+ipo"][1] > max(rates["base"][1], rates["sft"][1])
