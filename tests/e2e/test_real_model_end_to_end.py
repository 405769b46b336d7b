"""Proof on a real pretrained model (issue 12 section 4): SmolLM2-135M-Instruct, made by
the real ``ipo models fetch``, trained through the API and a real Celery worker with the unchanged openai
SDK, then measured on held-out questions that no training file contains (``worker.training.behaviour``:
greedy and sampled replies from the base and from base + the downloaded adapter(s), applied with PEFT).

The behaviour (``worker.training.answer_format``): replies that open with ``Answer:``. The base model never
does; correctness is measured too and must not fall (a one-word format would trade it away on this model).
The rates before and after and every reply are printed (pytest -s).
"""

from __future__ import annotations

import io
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import fresh_database
from tests.e2e.conftest import Stack, _stack
from worker.training import answer_format

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(2400)]

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def real_stack(
    redis_url: str | None, queue_name: str, smollm2_models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    with fresh_database(tmp_path_factory.mktemp("db"), "ipo_e2e_real") as database_url:
        yield from _stack(database_url, redis_url, queue_name + "-real", smollm2_models_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def base_report(smollm2_models_dir: Path) -> Any:
    from worker.training.behaviour import load_chain, measure

    model, tokenizer = load_chain(smollm2_models_dir / MODEL)
    return measure(model, tokenizer, samples=4, seed=0)


def _client(stack: Stack) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=stack.url + "/v1", api_key=stack.api_key, max_retries=5, timeout=120)


def _method(kind: str, hyperparameters: dict[str, Any]) -> dict[str, Any]:
    return {"type": kind, kind: {"hyperparameters": hyperparameters, "samples": answer_format.NO_SAMPLES}}


def _run(stack: Stack, client: Any, rows: list[Any], tmp_path: Path, name: str, **create: Any) -> Any:
    """Upload ``rows``, create the job, wait for it to succeed; returns the finished job."""
    path = answer_format.write_jsonl(rows, tmp_path / f"{name}.jsonl")
    file = client.files.create(file=path.open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        training_file=file.id, suffix=name, seed=0, extra_headers={"Idempotency-Key": f"real-{name}"}, **create
    )
    deadline = time.monotonic() + 1800
    while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, job
        time.sleep(2)
    assert job.status == "succeeded", (job, (stack.logs / "worker.log").read_text()[-4000:])
    return job


def _adapter(client: Any, job: Any, out: Path) -> Path:
    zipfile.ZipFile(io.BytesIO(client.files.content(job.result_files[0]).read())).extractall(out)
    return out


def _summary(label: str, report: Any) -> str:
    return (
        f"{label}: Answer: {report.prefix_rate:.2f} greedy / {report.sampled_prefix_rate:.2f} sampled, "
        f"concise {report.concise_rate:.2f} / {report.sampled_concise_rate:.2f}, correct {report.correct_rate:.2f} "
        f"({report.n_prompts} prompts, {report.n_samples} samples)"
    )


def test_ipo_teaches_a_real_model_the_answer_format_without_losing_correctness(
    real_stack: Stack, smollm2_models_dir: Path, base_report: Any, tmp_path: Path
) -> None:
    from worker.training.behaviour import load_chain, measure

    held_out = {f.question for f in answer_format.HELD_OUT_FACTS}
    assert not held_out & {f.question for f in answer_format.TRAIN_FACTS}
    client = _client(real_stack)
    started = time.monotonic()
    job = _run(
        real_stack,
        client,
        answer_format.preference_rows(),
        tmp_path,
        "ipo",
        model=MODEL,
        method=_method("ipo", answer_format.IPO_HYPERPARAMETERS),
    )
    seconds = time.monotonic() - started
    assert job.fine_tuned_model.startswith(f"ft:{MODEL}:ipo:")
    model, tokenizer = load_chain(smollm2_models_dir / MODEL, [_adapter(client, job, tmp_path / "adapter")])
    after = measure(model, tokenizer, samples=4, seed=0)
    print(f"\n{_summary('base', base_report)}\n{_summary('base + IPO', after)}\njob {seconds:.0f}s")
    for before_e, after_e in zip(base_report.examples, after.examples, strict=True):
        print(f"  {before_e['prompt']}\n    base: {before_e['reply']}\n    IPO:  {after_e['reply']}")

    # the base model lacks the behaviour and answers the held-out questions correctly
    assert base_report.prefix_rate == 0 and base_report.sampled_prefix_rate <= 0.1
    assert base_report.correct_rate >= 0.8
    # IPO taught it, on questions it never saw, in its mode and in its samples
    assert after.prefix_rate >= 0.8 and after.sampled_prefix_rate >= 0.6
    # without trading correctness away (at most one held-out answer lost)
    assert after.correct_rate >= base_report.correct_rate - 1 / base_report.n_prompts


def test_supervised_then_ipo_on_a_real_model(
    real_stack: Stack, smollm2_models_dir: Path, base_report: Any, tmp_path: Path
) -> None:
    """Issue 15's proof on the real model: a supervised job teaches the format (half its replies end with the
    filler ``TAIL``, so imitation cannot tell which ending is preferred); an IPO job on its
    ``fine_tuned_model`` (reference: the SFT model) then prefers the concise reply."""
    from worker.training.behaviour import load_chain, measure

    client = _client(real_stack)
    started = time.monotonic()
    sft = _run(
        real_stack,
        client,
        answer_format.supervised_rows(),
        tmp_path,
        "sft",
        model=MODEL,
        method=_method("supervised", answer_format.SFT_HYPERPARAMETERS),
    )
    ipo = _run(
        real_stack,
        client,
        answer_format.concise_preference_rows(),
        tmp_path,
        "sft-ipo",
        model=sft.fine_tuned_model,
        method=_method("ipo", answer_format.IPO_HYPERPARAMETERS),
    )
    seconds = time.monotonic() - started
    assert (ipo.model_extra or {})["lineage"]["parent_job_id"] == sft.id
    sft_adapter = _adapter(client, sft, tmp_path / "sft-adapter")
    ipo_adapter = _adapter(client, ipo, tmp_path / "ipo-adapter")
    base_dir = smollm2_models_dir / MODEL
    after_sft = measure(*load_chain(base_dir, [sft_adapter]), samples=4, seed=0)
    after_ipo = measure(*load_chain(base_dir, [sft_adapter, ipo_adapter]), samples=4, seed=0)
    print(
        f"\n{_summary('base', base_report)}\n{_summary('base + SFT', after_sft)}\n"
        f"{_summary('base + SFT + IPO', after_ipo)}\njobs {seconds:.0f}s"
    )
    for b, s1, s2 in zip(base_report.examples, after_sft.examples, after_ipo.examples, strict=True):
        print(f"  {b['prompt']}\n    base: {b['reply']}\n    SFT:  {s1['reply']}\n    +IPO: {s2['reply']}")

    # the supervised stage taught the format (a behaviour the base lacks), with the filler left in a share of
    # the sampled replies (in process: 0.73 concise)
    assert after_sft.prefix_rate >= 0.8 and after_sft.sampled_prefix_rate >= 0.8
    assert after_sft.sampled_concise_rate <= 0.85
    # the preference stage made the concise ending the habit, sampled too (in process: 0.98)
    assert after_ipo.prefix_rate >= 0.8 and after_ipo.concise_rate >= 0.8
    assert after_ipo.sampled_concise_rate >= max(0.9, after_sft.sampled_concise_rate + 0.1)
    # and neither stage traded correctness away (at most one held-out answer lost)
    assert after_ipo.correct_rate >= base_report.correct_rate - 1 / base_report.n_prompts
