"""Steps 2-4 of a preference run (IPO, DPO): the preference data, the model, cached reference log-probs,
TRL's ``DPOConfig`` and the ``IpoDPOTrainer`` with its callbacks (reporting, stop, divergence guard,
samples). ``run.py`` calls :func:`build_preference_trainer`; the supervised counterpart is ``sft.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.training.distributed import current_rank, fsdp_active
from worker.training.reporter import Reporter
from worker.training.request import TrainRequest

if TYPE_CHECKING:
    from worker.training.holdout import Holdout
    from worker.training.recipe import TrainingConfig


def build_preference_trainer(
    request: TrainRequest,
    reporter: Reporter,
    flag: Any,
    cfg: TrainingConfig,
    template: str,
    tokenizer: Any,
    out: Path,
    device: str,
    specials: tuple[str, ...],
    held_out: Holdout | None,
) -> tuple[Any, Any, int]:
    """Steps 2-4 for IPO/DPO: the preference data, the model, cached reference log-probs, ``IpoDPOTrainer``;
    samples from the prompts ``held_out`` of the training file when there are."""
    from worker.training.callbacks import ReportingCallback
    from worker.training.data import describe_skipped, load_preference_data
    from worker.training.loading import load_model
    from worker.training.ref_cache import PreparedInputs

    train_data = load_preference_data(request.train_file, tokenizer, max_length=cfg.max_length, special_tokens=specials)
    eval_data = None
    if request.validation_file:
        eval_data = load_preference_data(
            request.validation_file,
            tokenizer,
            max_length=cfg.max_length,
            name="validation file",
            special_tokens=specials,
        )
    cfg = cfg.model_copy(update={"text_rows": train_data.text_mode, "chat_template": template})
    if fsdp_active():  # no reference pass outside the sharded model (distributed.fsdp_active)
        cfg = cfg.model_copy(update={"precompute_ref_log_probs": False})
    reporter.resolved(cfg.resolved_dict())
    for prepared, name in ((train_data, "training file"), (eval_data, "validation file")):
        if prepared is not None and prepared.text_rows:
            reporter.event(f"{name}: {prepared.text_rows}")
        warning = describe_skipped(prepared, cfg.max_length, name) if prepared else None
        if warning:
            reporter.event(warning, level="warn")

    # 3. model, and the cached tokenized pairs + reference log-probs of an earlier run, if any
    model = load_model(request.model_path, cfg, request.parent_adapters)
    cached = PreparedInputs(request, cfg, tokenizer, device)
    # FSDP: TRL's per-step reference forward inside the sharded model instead (distributed.fsdp_active)
    precompute = cached.load(cfg.precompute_ref_log_probs) if not fsdp_active() else False

    # 4. trainer
    reporting = ReportingCallback(reporter, total_steps=cfg.total_steps, beta=cfg.beta, loss_type=cfg.loss_type)
    # samples are rank 0's alone (generation is not collective; the others would only repeat them)
    samples = (
        samples_callback(request, cfg, tokenizer, out, reporter, reporting, held_out)
        if current_rank().is_main
        else None
    )
    trainer = _build_trainer(
        model,
        tokenizer,
        dpo_args(cfg, out, precompute=precompute, evaluate=eval_data is not None),
        cfg,
        train_dataset=cached.train if cached.train is not None else train_data.dataset,
        eval_dataset=cached.eval if cached.eval is not None else (eval_data.dataset if eval_data else None),
        reporting=reporting,
        flag=flag,
        extra_callbacks=[samples] if samples is not None else [],
    )
    if current_rank().is_main:  # every rank computed the same scores; one writes them to the cache
        cached.report_and_store(trainer, reporter)
    return trainer, reporting, train_data.n_examples


def samples_callback(
    request: TrainRequest,
    cfg: TrainingConfig,
    tokenizer: Any,
    out: Path,
    reporter: Reporter,
    reporting: Any,
    held_out: Holdout | None = None,
) -> Any:
    """``SamplesCallback`` for the method's ``samples`` block, or None when ``n_prompts`` is 0. Samples at the
    evaluation cadence (``eval_every``; without a validation file the same rule, a quarter of the run)."""
    from worker.settings import WorkerSettings
    from worker.training.graders import GraderEndpoint, Graders
    from worker.training.samples import SamplesCallback, choose_prompts

    config = request.method.params().samples
    if config.n_prompts == 0:
        return None
    settings = WorkerSettings()  # the worker's environment, inherited by this child: the grader endpoint
    endpoint = None
    if settings.grader_base_url:
        key = settings.grader_api_key.get_secret_value() if settings.grader_api_key else None
        endpoint = GraderEndpoint(settings.grader_base_url, key, settings.grader_timeout_seconds)
    graders = Graders(config.graders, endpoint)
    if warning := graders.startup_warning():
        reporter.event(warning, level="warn")
    prompts, source = choose_prompts(
        tokenizer,
        validation_file=request.validation_file,
        train_file=request.train_file,
        held_out_file=str(held_out.samples_file) if held_out else None,
        held_out_lines=held_out.lines if held_out else (),
        n_prompts=config.n_prompts,
        max_length=cfg.max_length,
    )
    note = (
        ""
        if request.validation_file or held_out
        else " (no validation file and none held out, see samples.holdout: these prompts are also trained on)"
    )
    reporter.event(f"samples: {len(prompts)} prompts from the {source}{note}")
    return SamplesCallback(
        reporter,
        tokenizer,
        prompts,
        source=source,
        config=config,
        every=cfg.eval_every or max(1, cfg.total_steps // 4),
        seed=cfg.seed,
        out_path=out / "samples.jsonl",
        total_steps=cfg.total_steps,
        metrics_rows=reporting.rows,
        graders=graders,
    )


def dpo_args(cfg: TrainingConfig, out: Path, *, precompute: bool, evaluate: bool) -> Any:
    """TRL ``DPOConfig`` for the resolved recipe: the IPO (or sigmoid) loss, plus TRL's "sft" NLL term when
    ``sft_weight`` > 0; checkpoints under ``out/checkpoints`` every ``checkpoint_every`` steps; no hub, no
    trackers (progress is reported through the callbacks)."""
    from trl import DPOConfig

    from worker.training.arguments import shared_arguments

    loss_type: list[str] = [str(cfg.loss_type)] + (["sft"] if cfg.sft_weight > 0 else [])
    loss_weights = [1.0] + ([cfg.sft_weight] if cfg.sft_weight > 0 else [])
    return DPOConfig(
        **shared_arguments(cfg, out, evaluate=evaluate),
        loss_type=loss_type,
        loss_weights=loss_weights,
        beta=cfg.beta,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        precompute_ref_log_probs=precompute,
        precompute_ref_batch_size=2 * cfg.batch_size,  # no grad, no activations kept: twice the batch fits
    )


def _build_trainer(
    model: Any,
    tokenizer: Any,
    args: Any,
    cfg: TrainingConfig,
    *,
    train_dataset: Any,
    eval_dataset: Any,
    reporting: Any,
    flag: Any,
    extra_callbacks: list[Any] | None = None,
) -> Any:
    """``IpoDPOTrainer`` with the LoRA adapter and the reporting, stop and divergence callbacks (the guard
    after the stop callback: its ``should_save = False`` must override a pause's save), then
    ``extra_callbacks`` (samples: they see the guard's and the stop's decision)."""
    from worker.training.callbacks import LogAtSaveSteps, NonFiniteGuard, StopCallback, TokenCountInLogHistory
    from worker.training.loading import lora_config
    from worker.training.trainer import IpoDPOTrainer

    return IpoDPOTrainer(
        model=model,
        ref_model=None,  # PEFT: the reference is the base model with the adapter disabled (no second copy)
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=lora_config(cfg),
        callbacks=[
            reporting,
            TokenCountInLogHistory(reporting),
            StopCallback(flag),
            LogAtSaveSteps(),
            NonFiniteGuard(reporting),
            *(extra_callbacks or []),
        ],
    )
