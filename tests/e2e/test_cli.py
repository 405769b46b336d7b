"""The ``ipo`` CLI through its real entry point against a live server and worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import Stack
from worker.training.demo_data import write_demo_data

pytestmark = pytest.mark.e2e


def ipo(stack: Stack, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "IPO_BASE_URL": stack.url, "IPO_API_KEY": stack.api_key}
    out = subprocess.run(
        [sys.executable, "-m", "ipo_cli.main", *args], env=env, capture_output=True, text=True, timeout=600
    )
    if check:
        assert out.returncode == 0, (args, out.stdout[-2000:], out.stderr[-2000:])
    return out


def test_cli_flow(stack: Stack, tmp_path: Path) -> None:
    train, _ = write_demo_data(tmp_path / "data", n_train=32, n_valid=8, seed=7)
    assert "is valid: 32 examples" in ipo(stack, "data", "validate", str(train)).stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "chosen": "a", "rejected": "a"}\n{oops\n')
    invalid = ipo(stack, "data", "validate", str(bad), check=False)
    assert invalid.returncode == 2 and "line 1" in invalid.stdout and "line 2" in invalid.stdout

    created = json.loads(
        ipo(
            stack,
            "jobs",
            "create",
            "--training-file",
            str(train),
            "--beta",
            "0.5",
            "--suffix",
            "cli",
            "--json",
            "--spec",
            str(_spec(tmp_path)),
        ).stdout
    )
    assert created["status"] == "queued" and created["method"]["ipo"]["hyperparameters"]["max_steps"] == 8

    watched = ipo(stack, "jobs", "watch", created["id"])
    assert "succeeded" in watched.stdout
    # Samples (worker/training/samples.py): every 2 steps of 8. No validation file: samples.holdout "auto"
    # holds out a tenth of the 32 distinct training prompts (3), which are not trained on.
    shown = ipo(stack, "jobs", "samples", created["id"]).stdout
    assert shown.startswith("step 8: 3 prompts from the held-out training prompts") and shown.count("policy:") == 3
    assert "reference:" in shown and "log p(chosen)" in shown
    at_4 = json.loads(ipo(stack, "jobs", "samples", created["id"], "--step", "4", "--json").stdout)
    assert at_4["step"] == 4 and len(at_4["samples"]) == 3 and "policy_logp_rejected" in at_4["samples"][0]
    missing_step = ipo(stack, "jobs", "samples", created["id"], "--step", "3", check=False)
    assert missing_step.returncode == 2 and "steps sampled: 2, 4, 6, 8" in missing_step.stderr
    job = json.loads(ipo(stack, "jobs", "get", created["id"], "--json").stdout)
    assert len(job["result_files"]) == 3  # adapter, metrics.csv, samples.jsonl
    # Any file by id: here the metrics CSV, named as stored unless --out says otherwise.
    metrics_id = next(
        f
        for f in job["result_files"]
        if json.loads(ipo(stack, "files", "get", f, "--json").stdout)["filename"].endswith(".csv")
    )
    got = ipo(stack, "files", "download", metrics_id, "--out", str(tmp_path / "m.csv")).stdout
    assert got.startswith(str(tmp_path / "m.csv")) and (tmp_path / "m.csv").read_text().startswith("split,step,")
    # Every event (--all pages through them: tests/unit/test_cli_events.py), vs the newest few.
    every = json.loads(ipo(stack, "jobs", "events", created["id"], "--all", "--json").stdout)["data"]
    newest = json.loads(ipo(stack, "jobs", "events", created["id"], "--limit", "5", "--json").stdout)["data"]
    assert len({e["id"] for e in every}) == len(every) > 5 and every[:5] == newest
    assert every[-1]["message"].startswith("Created fine-tuning job")
    out_dir = tmp_path / "adapter"
    ipo(stack, "jobs", "download", created["id"], "--out", str(out_dir))
    assert (out_dir / "adapter_model.safetensors").is_file()
    # A checkpoint (by step number) instead of the final adapter, merged into a standalone model.
    ckpt = tmp_path / "ckpt"
    base = str(stack.models_dir / "tiny-mistral")
    args = ("--checkpoint", "4", "--out", str(ckpt), "--merged", "--base", base)
    got = ipo(stack, "jobs", "download", created["id"], *args).stdout
    assert "merged model in" in got and any(ckpt.rglob("adapter_model.safetensors"))
    _assert_merged_differs_from_base(tmp_path / "ckpt-merged", stack.models_dir / "tiny-mistral")
    unknown = ipo(stack, "jobs", "download", created["id"], "--checkpoint", "999", "--out", str(ckpt), check=False)
    assert unknown.returncode == 2 and "no checkpoint '999'" in unknown.stderr

    listed = ipo(stack, "files", "list").stdout
    assert created["training_file"] in listed
    spare = json.loads(ipo(stack, "files", "upload", str(train), "--json").stdout)
    assert json.loads(ipo(stack, "files", "delete", spare["id"], "--json").stdout)["deleted"] is True

    missing = ipo(stack, "jobs", "get", "ftjob-doesnotexist", check=False)
    assert (
        missing.returncode == 3 and missing.stderr.startswith("ipo: error: 404") and "Traceback" not in missing.stderr
    )
    env_less = subprocess.run(
        [
            sys.executable,
            "-m",
            "ipo_cli.main",
            "jobs",
            "list",
            "--base-url",
            "http://127.0.0.1:9",
            "--api-key",
            "ipo-sk-x",
        ],
        capture_output=True,
        text=True,
    )
    assert env_less.returncode == 4 and "cannot reach" in env_less.stderr


def _spec(tmp_path: Path) -> Path:
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "model: tiny-mistral\nmethod:\n  type: ipo\n  ipo:\n    hyperparameters:\n      max_steps: 8\n"
        "      batch_size: 8\n"
    )
    return spec


def _assert_merged_differs_from_base(merged: Path, base: Path) -> None:
    from transformers import AutoModelForCausalLM

    merged_sd = AutoModelForCausalLM.from_pretrained(merged).state_dict()
    base_sd = AutoModelForCausalLM.from_pretrained(base).state_dict()
    assert merged_sd.keys() == base_sd.keys()  # plain weights: no lora_A/lora_B left over
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not merged_sd[q].equal(base_sd[q])  # the checkpoint's LoRA delta was folded in


def test_a_spec_file_round_trips_through_the_cli(stack: Stack, tmp_path: Path) -> None:
    train, _ = write_demo_data(tmp_path / "data", n_train=16, n_valid=4, seed=3)
    first_spec = tmp_path / "first.yaml"
    first_spec.write_text(  # a local path where a file id goes: the CLI uploads it
        f"spec_version: 1\nmodel: tiny-mistral\ntraining_file: {train}\nseed: 11\n"
        "method:\n  type: ipo\n  ipo:\n    hyperparameters:\n      beta: 0.3\n      max_steps: 2\n"
    )
    first = json.loads(ipo(stack, "jobs", "create", "--spec", str(first_spec), "--json").stdout)
    written = tmp_path / "written.yaml"
    ipo(stack, "jobs", "spec", first["id"], "--out", str(written))
    text = written.read_text()
    assert text.startswith("# ipo-align job spec v1") and "/schemas/job-spec.v1.json" in text
    second = json.loads(ipo(stack, "jobs", "create", "--spec", str(written), "--json").stdout)
    as_json = tmp_path / "second.json"
    ipo(stack, "jobs", "spec", second["id"], "--out", str(as_json))

    import yaml

    replayed, original = json.loads(as_json.read_text()), yaml.safe_load(text)
    assert replayed == original  # create from spec -> spec of the job -> the identical spec
    assert original["training_file"] == first["training_file"] and original["seed"] == 11
    assert original["method"]["ipo"]["hyperparameters"]["beta"] == 0.3
    for job in (first, second):
        ipo(stack, "jobs", "cancel", job["id"], check=False)  # may have finished already: 2 steps

    future = tmp_path / "future.yaml"
    future.write_text(text.replace("spec_version: 1", "spec_version: 2"))
    refused = ipo(stack, "jobs", "create", "--spec", str(future), check=False)
    assert refused.returncode == 2 and "spec_version 2 is not supported" in refused.stderr
