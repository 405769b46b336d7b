"""Real TRL runs on the tiny model (CPU)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import BatchEncoding

from contracts.method import Method
from worker.training.callbacks import StopFlag
from worker.training.reporter import ListReporter
from worker.training.request import EXIT_OK, EXIT_STOPPED, TrainRequest
from worker.training.run import train

METRIC_FIELDS = {
    "step", "total_steps", "epoch", "train_loss", "learning_rate", "grad_norm", "tokens_per_second",
    "eta_seconds", "ipo_margin", "ipo_margin_target", "preference_accuracy",
}  # fmt: skip


def _request(model: Path, data: tuple[Path, Path], out: Path, validation: bool = True, **hp: Any) -> TrainRequest:
    return TrainRequest(
        job_id="job-test",
        attempt=1,
        model_path=str(model),
        train_file=str(data[0]),
        validation_file=str(data[1]) if validation else None,
        output_dir=str(out),
        seed=0,
        device="cpu",
        method=Method.model_validate({"type": "ipo", "ipo": {"hyperparameters": hp}}),
    )


def test_train_reports_checkpoints_and_adapter(
    tiny_model_dir: Path, demo_files: tuple[Path, Path], tmp_path: Path
) -> None:
    reporter = ListReporter()
    request = _request(
        tiny_model_dir, demo_files, tmp_path / "run", max_steps=4, checkpoint_every=2, batch_size=4, beta=0.5
    )
    assert train(request, reporter) == EXIT_OK
    kinds = [r.kind for r in reporter.reports]
    assert kinds[0] == "resolved" and kinds[-1] == "done"
    resolved = reporter.reports[0].data or {}
    assert resolved["beta"] == 0.5 and resolved["quantization"] == "none" and resolved["total_steps"] == 4

    train_metrics = [r.data for r in reporter.of_kind("metrics") if r.data and "train_loss" in r.data]
    assert [m["step"] for m in train_metrics] == [1, 2, 3, 4]  # logging_steps=1 for a 4-step run
    for m in train_metrics:
        assert set(m) >= METRIC_FIELDS, METRIC_FIELDS - set(m)
        assert "gpu_memory_bytes" not in m and m["peak_rss_bytes"] > 50 * 2**20  # CPU: no GPU figure
        assert m["ipo_margin_target"] == pytest.approx(1.0)
        assert 0.0 <= m["preference_accuracy"] <= 1.0
    valid = [r.data for r in reporter.of_kind("metrics") if r.data and "valid_loss" in r.data]
    assert valid and "valid_preference_accuracy" in valid[-1]

    checkpoints = reporter.of_kind("checkpoint")
    assert [c.step for c in checkpoints] == [2, 4]
    for c in checkpoints:
        assert c.path and Path(c.path).name == f"step-{c.step}"
        assert (Path(c.path) / "adapter_model.safetensors").exists() and (Path(c.path) / "trainer_state.json").exists()
        assert c.data and "train_loss" in c.data
    # a checkpoint is reported after (not before) the metrics of its step
    assert kinds.index("checkpoint") > kinds.index("metrics")

    artifacts = {r.name: Path(r.path or "") for r in reporter.of_kind("artifact")}
    adapter = artifacts["adapter"]
    assert (adapter / "adapter_model.safetensors").exists() and (adapter / "adapter_config.json").exists()
    assert (adapter / "tokenizer.json").exists()
    with artifacts["metrics"].open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) >= 4
    assert (reporter.of_kind("done")[0].data or {})["trained_tokens"] > 0

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, str(adapter))
    tok = AutoTokenizer.from_pretrained(adapter)
    assert tok.chat_template
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is 1 plus 2?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    assert isinstance(ids, BatchEncoding)
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_bad_training_file_is_reported(tiny_model_dir: Path, demo_files: tuple[Path, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "chosen": "same", "rejected": "same"}\nnot json\n')
    reporter = ListReporter()
    rc = train(_request(tiny_model_dir, (bad, demo_files[1]), tmp_path / "run"), reporter)
    assert rc not in (EXIT_OK, EXIT_STOPPED)
    errors = reporter.of_kind("error")
    assert errors and errors[0].code == "invalid_training_file" and "line 2" in (errors[0].message or "")


def test_nf4_on_cpu_fails_clearly(tiny_model_dir: Path, demo_files: tuple[Path, Path], tmp_path: Path) -> None:
    request = _request(tiny_model_dir, demo_files, tmp_path / "run")
    request.method = Method.model_validate({"type": "ipo", "ipo": {"lora": {"quantization": "nf4"}}})
    reporter = ListReporter()
    assert train(request, reporter) not in (EXIT_OK, EXIT_STOPPED)
    assert "lora.quantization" in (reporter.of_kind("error")[0].message or "")


def test_cancel_stops_without_checkpoint(tiny_model_dir: Path, demo_files: tuple[Path, Path], tmp_path: Path) -> None:
    flag = StopFlag()
    flag.request("cancelled")
    reporter = ListReporter()
    rc = train(
        _request(tiny_model_dir, demo_files, tmp_path / "run", validation=False, max_steps=5, checkpoint_every=100),
        reporter,
        flag,
    )
    assert rc == EXIT_STOPPED
    assert not reporter.of_kind("checkpoint") and not reporter.of_kind("done")


def test_a_far_ipo_target_at_a_lora_rate_is_warned_about(
    tiny_model_dir: Path, demo_files: tuple[Path, Path], tmp_path: Path
) -> None:
    """beta 0.1 (TRL's and OpenAI's DPO default) at the tiny preset's lr 1e-3: one warn event naming the 5-nat
    target, and the job trains as asked (stopped here before its first step, to stay quick)."""
    flag = StopFlag()
    flag.request("cancelled")
    warned = ListReporter()
    request = _request(tiny_model_dir, demo_files, tmp_path / "far", validation=False, max_steps=2, beta=0.1)
    assert train(request, warned, flag) == EXIT_STOPPED
    (warning,) = [r for r in warned.of_kind("event") if r.level == "warn"]
    assert "margin target 1/(2*beta) at 5 nats per token" in (warning.message or "")
    assert "learning_rate 0.001 (auto: this model's preset)" in (warning.message or "")
    assert (warning.data or {})["ipo_margin_target_warning"]["ipo_margin_target"] == pytest.approx(5.0)

    quiet = ListReporter()
    request = _request(tiny_model_dir, demo_files, tmp_path / "near", validation=False, max_steps=2, beta=0.5)
    assert train(request, quiet, flag) == EXIT_STOPPED
    assert not [r for r in quiet.of_kind("event") if r.level == "warn"]


def _adapter_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


def test_pause_and_resume_matches_uninterrupted(
    tiny_model_dir: Path, demo_files: tuple[Path, Path], tmp_path: Path
) -> None:
    hp = {"max_steps": 6, "batch_size": 4, "checkpoint_every": 100, "beta": 0.5}
    full = ListReporter()
    assert train(_request(tiny_model_dir, demo_files, tmp_path / "full", validation=False, **hp), full) == EXIT_OK

    flag = StopFlag()
    flag.stop_at_step = 3
    first = ListReporter()
    assert (
        train(_request(tiny_model_dir, demo_files, tmp_path / "a1", validation=False, **hp), first, flag)
        == EXIT_STOPPED
    )
    (ckpt,) = first.of_kind("checkpoint")
    assert ckpt.step == 3 and ckpt.path

    second = ListReporter()
    request = _request(tiny_model_dir, demo_files, tmp_path / "a2", validation=False, **hp)
    request.resume_from = ckpt.path
    assert train(request, second) == EXIT_OK
    steps = [r.data["step"] for r in second.of_kind("metrics") if r.data and "train_loss" in r.data]
    assert steps[0] == 4 and steps[-1] == 6

    def losses(reporter: ListReporter) -> dict[int, float]:
        return {
            r.data["step"]: r.data["train_loss"]
            for r in reporter.of_kind("metrics")
            if r.data and "train_loss" in r.data
        }

    uninterrupted, resumed = losses(full), losses(first) | losses(second)
    assert sorted(resumed) == sorted(uninterrupted)  # the same loss curve, step for step
    for step, loss in uninterrupted.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-4, abs=1e-6), step

    expected = _adapter_weights(tmp_path / "full" / "adapter")
    got = _adapter_weights(tmp_path / "a2" / "adapter")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA needs a CUDA device")
def test_qlora_on_cuda(tiny_model_dir: Path, demo_files: tuple[Path, Path], tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    request = _request(tiny_model_dir, demo_files, tmp_path / "run", validation=False, max_steps=3, batch_size=4)
    request.device = "cuda"
    reporter = ListReporter()
    assert train(request, reporter) == EXIT_OK
    assert (reporter.reports[0].data or {})["quantization"] == "nf4"
    metrics = [r.data for r in reporter.of_kind("metrics") if r.data and "train_loss" in r.data]
    assert metrics and all(m["gpu_memory_bytes"] > 0 for m in metrics)  # read by the API's /metrics gauge
    weights = _adapter_weights(tmp_path / "run" / "adapter")
    # LoRA B starts at zero: a trained adapter must have moved it (bitsandbytes on CPU would not)
    assert any(t.abs().sum() > 0 for n, t in weights.items() if "lora_B" in n)


def test_gpu_memory_is_reported_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA branch without a GPU (test_qlora_on_cuda runs it for real where there is one)."""
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    from worker.training.callbacks import ReportingCallback

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 7 * 2**30)
    reporter = ListReporter()
    callback = ReportingCallback(reporter, total_steps=2, beta=0.5, loss_type="ipo")
    state, control = TrainerState(), TrainerControl()
    callback.on_train_begin(SimpleNamespace(device=torch.device("cuda")), state, control)  # type: ignore[arg-type]
    state.global_step = 1
    callback.on_log(SimpleNamespace(), state, control, logs={"loss": 0.5, "num_tokens": 10})  # type: ignore[arg-type]
    (metrics,) = reporter.of_kind("metrics")
    assert metrics.data and metrics.data["gpu_memory_bytes"] == 7 * 2**30 and metrics.data["peak_rss_bytes"] > 0


def test_divergence_fails_the_job_and_keeps_the_last_finite_checkpoint(
    tiny_model_dir: Path, demo_files: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The adapter's weights become NaN during step 5 (written there after the real backward pass, so the
    step's logged loss and gradient norm stay finite): only the weight check can see it. The job must
    fail, never "succeed" with a NaN adapter, and every checkpoint it reported must hold finite weights.

    The NaN is put there rather than provoked with a huge learning rate: whether lr 1.0 turns the weights
    into NaN or leaves them huge but finite depends on the machine's floating point (issue 13, fault 10)."""
    from worker.training.trainer import IpoDPOTrainer

    real_step = IpoDPOTrainer.training_step

    def step(self: IpoDPOTrainer, *args: Any, **kwargs: Any) -> Any:
        loss = real_step(self, *args, **kwargs)
        if self.state.global_step == 4:  # during step 5
            assert self.model is not None
            with torch.no_grad():
                next(p for p in self.model.parameters() if p.requires_grad).fill_(float("nan"))
        return loss

    monkeypatch.setattr(IpoDPOTrainer, "training_step", step)
    reporter = ListReporter()
    hp = {"max_steps": 12, "checkpoint_every": 2, "batch_size": 4, "beta": 0.5}
    request = _request(tiny_model_dir, demo_files, tmp_path / "run", validation=False, **hp)
    assert train(request, reporter) != EXIT_OK
    error = reporter.reports[-1]
    assert error.kind == "error" and error.code == "nan_loss", error
    assert "diverged at step 5: the adapter's weights became NaN/inf" in (error.message or "")
    checkpoints = reporter.of_kind("checkpoint")
    assert [c.step for c in checkpoints] == [2, 4]
    assert "The last good checkpoint is step 4" in (error.message or "")
    assert not reporter.of_kind("artifact") and not reporter.of_kind("done")
    for ckpt in checkpoints:
        weights = load_file(str(Path(ckpt.path or "") / "adapter_model.safetensors"))
        assert all(torch.isfinite(t).all() for t in weights.values()), ckpt.step


def test_a_finite_explosion_fails_the_job_as_diverged_before_its_checkpoint(
    tiny_model_dir: Path, demo_files: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From step 6 on the loss is scaled by 1e6 before its backward pass, so the logged loss and the
    gradient norm explode while every weight stays finite (gradients are clipped to norm 1): a run the
    NaN checks alone would call a success. It must fail as ``diverged`` at step 6, and step 6's own
    checkpoint (due, checkpoint_every=2) must not be written."""
    from worker.training.trainer import IpoDPOTrainer

    real_compute_loss = IpoDPOTrainer.compute_loss

    def compute_loss(self: IpoDPOTrainer, *args: Any, **kwargs: Any) -> Any:
        result = real_compute_loss(self, *args, **kwargs)
        assert self.model is not None
        if not self.model.training or self.state.global_step < 5:  # from step 6 on
            return result
        if isinstance(result, tuple):
            return (result[0] * 1e6, *result[1:])
        return result * 1e6

    monkeypatch.setattr(IpoDPOTrainer, "compute_loss", compute_loss)
    reporter = ListReporter()
    hp = {"max_steps": 12, "checkpoint_every": 2, "batch_size": 4, "beta": 0.5}
    request = _request(tiny_model_dir, demo_files, tmp_path / "run", validation=False, **hp)
    assert train(request, reporter) != EXIT_OK
    error = reporter.reports[-1]
    assert error.kind == "error" and error.code == "diverged", error
    message = error.message or ""
    assert "diverged at step 6: the loss exploded to" in message and "more than 100 times" in message
    assert "The last good checkpoint is step 4" in message
    assert [c.step for c in reporter.of_kind("checkpoint")] == [2, 4]
    assert not reporter.of_kind("artifact") and not reporter.of_kind("done")
    logged = [r.data for r in reporter.of_kind("metrics") if r.data and "train_loss" in r.data]
    assert logged[-1]["step"] == 6 and all(torch.isfinite(torch.tensor(m["train_loss"])) for m in logged)


def test_cuda_out_of_memory_fails_with_its_code_after_reporting_checkpoints(
    tiny_model_dir: Path, demo_files: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No GPU here, so the CUDA allocator's error is raised from inside the real training loop at step 3."""
    from worker.training.trainer import IpoDPOTrainer

    real_step = IpoDPOTrainer.training_step

    def step(self: IpoDPOTrainer, *args: Any, **kwargs: Any) -> Any:
        if self.state.global_step == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(IpoDPOTrainer, "training_step", step)
    reporter = ListReporter()
    request = _request(tiny_model_dir, demo_files, tmp_path / "run", validation=False, max_steps=6, checkpoint_every=2)
    assert train(request, reporter) != EXIT_OK
    error = reporter.reports[-1]
    assert error.kind == "error" and error.code == "out_of_memory"
    assert "Lower batch_size or max_length" in (error.message or "")
    assert [c.step for c in reporter.of_kind("checkpoint")] == [2]


def test_resuming_at_the_last_step_trains_nothing_more(
    tiny_model_dir: Path, demo_files: tuple[Path, Path], tmp_path: Path
) -> None:
    """A pause that lands on the final step leaves a checkpoint at max_steps; resuming from it must
    finish the job with that checkpoint's weights, not train a step past max_steps."""
    hp = {"max_steps": 4, "batch_size": 4, "checkpoint_every": 100, "beta": 0.5}
    flag = StopFlag()
    flag.stop_at_step = 4
    first = ListReporter()
    assert train(_request(tiny_model_dir, demo_files, tmp_path / "a1", validation=False, **hp), first, flag) == (
        EXIT_STOPPED
    )
    (ckpt,) = first.of_kind("checkpoint")
    assert ckpt.step == 4 and ckpt.path

    second = ListReporter()
    request = _request(tiny_model_dir, demo_files, tmp_path / "a2", validation=False, **hp)
    request.resume_from = ckpt.path
    assert train(request, second) == EXIT_OK
    assert not [r for r in second.of_kind("metrics") if r.data and "train_loss" in r.data]  # no step 5
    assert [r.kind for r in second.reports][-1] == "done"
    expected = _adapter_weights(Path(ckpt.path))
    got = _adapter_weights(tmp_path / "a2" / "adapter")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])
