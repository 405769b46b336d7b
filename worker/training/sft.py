"""Supervised fine-tuning: TRL's ``SFTTrainer`` with the loss on the assistant turns only.

The data (``contracts.sft_formats``) is tokenized here, not by TRL, into TRL's pre-tokenized shape:
``input_ids`` plus an ``assistant_masks`` column (1 = the token carries the loss). ``SFTTrainer`` turns
that column into ``labels`` (-100 elsewhere) and truncates to ``max_length`` (``keep_start``), exactly as
it does for the masks it makes itself (``SFTTrainer._prepare_dataset``, trl 1.16).

Why not TRL's ``assistant_only_loss=True``: TRL asks the chat template for the mask
(``return_assistant_tokens_mask``), which needs ``{% generation %}`` markers, and swaps in a patched
template only for the model families it knows (``trl.chat_template_utils.get_training_chat_template``);
for any other template, the tiny model's and most fine-tunes' included, it refuses to train. So the mask
is computed from the rendering itself, which works for every template that renders a conversation as
its turns in order ("prefix-preserving", the property TRL's patched templates are made to have):

- for each trained assistant turn ``i``, the turn's text runs from the end of
  ``render(messages[:i], add_generation_prompt=True)`` (the context plus the assistant header, as at
  inference) to the end of ``render(messages[:i + 1])`` (the reply and the template's end-of-turn
  token(s), so the model learns to stop);
- both renderings must be prefixes of the whole conversation's rendering; a template where they are not
  is refused with that reason (``DataError``) rather than trained on a wrong mask;
- the conversation is tokenized once, with character offsets, and a token is in the mask when it starts
  inside a trained turn's text.

``prompt_completion`` examples are conversations whose completion turns are the trained ones (TRL's
``completion_only_loss``); ``text`` examples train on every token, with the end-of-sequence token
appended as TRL's ``add_eos`` does. ``tests/training/test_sft.py`` checks the mask against TRL's own
(``{% generation %}``) mask on a template that has the markers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from contracts.sft_formats import SupervisedExample, parse_supervised_file
from worker.training.data import DataError

if TYPE_CHECKING:
    from datasets import Dataset

    from worker.training.recipe import TrainingConfig
    from worker.training.reporter import Reporter
    from worker.training.request import TrainRequest


@dataclass
class PreparedSupervised:
    dataset: Dataset
    """Columns ``input_ids`` and ``assistant_masks`` (TRL's pre-tokenized language-modeling shape)."""
    n_examples: int
    n_truncated: int
    """Examples longer than ``max_length`` (cut at the end; their first trained tokens still fit)."""
    n_unusable: int
    """Examples whose first trained token lies beyond ``max_length`` (nothing to learn: dropped)."""
    unusable_lines: list[int]
    n_tokens: int
    """Tokens over the file (one epoch), before truncation."""
    n_loss_tokens: int
    """Of those, tokens that carry the loss (before truncation)."""


def tokenize_example(tokenizer: Any, example: SupervisedExample) -> tuple[list[int], list[int]]:
    """``(input_ids, assistant_masks)`` of one example (see the module docstring for the rule).

    Raises ``DataError`` when the chat template does not render the conversation as its turns in order."""
    if example.text is not None:
        text = example.text
        eos = tokenizer.eos_token
        if eos and not text.endswith(eos):
            text += eos  # TRL's add_eos for language modeling
        ids = [int(i) for i in tokenizer(text)["input_ids"]]
        return ids, [1] * len(ids)
    messages, trained = example.messages or [], example.trained or []
    whole = _render(tokenizer, messages, generation_prompt=False)
    spans: list[tuple[int, int]] = []
    for i, is_trained in enumerate(trained):
        if not is_trained:
            continue
        start = _render(tokenizer, messages[:i], generation_prompt=True)
        end = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not (whole.startswith(start) and whole.startswith(end) and len(end) > len(start)):
            raise DataError(
                f"line {example.line}: the model's chat template does not render this conversation turn by turn "
                f"(message {i + 1}: the text before it, or the conversation up to it, is not how the whole "
                "conversation begins), so the assistant tokens cannot be told apart for the loss"
            )
        spans.append((len(start), len(end)))
    encoded = tokenizer(whole, add_special_tokens=False, return_offsets_mapping=True)
    ids = [int(i) for i in encoded["input_ids"]]
    mask = [1 if any(s <= begin < e for s, e in spans) else 0 for begin, _ in encoded["offset_mapping"]]
    return ids, mask


def _render(tokenizer: Any, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt))


def load_supervised_data(
    path: str | Path,
    tokenizer: Any,
    *,
    max_length: int,
    name: str = "training file",
    max_unusable_fraction: float = 0.5,
) -> PreparedSupervised:
    """Validate ``path`` and tokenize it with assistant masks.

    Raises ``DataError`` when the file is invalid, when the chat template cannot be masked (above), or when
    more than ``max_unusable_fraction`` of the examples have no trained token within ``max_length``."""
    from datasets import Dataset

    if tokenizer.chat_template is None:
        raise DataError("the model has no chat template: supervised conversations cannot be formatted")
    examples, report = parse_supervised_file(path)
    if not report.ok:
        raise DataError(report.summary(name))
    rows: list[dict[str, list[int]]] = []
    unusable: list[int] = []
    n_truncated = n_tokens = n_loss = 0
    for ex in examples:
        ids, mask = tokenize_example(tokenizer, ex)
        n_tokens += len(ids)
        n_loss += sum(mask)
        if 1 not in mask[:max_length]:
            unusable.append(ex.line)
            continue
        if len(ids) > max_length:
            n_truncated += 1
        rows.append({"input_ids": ids, "assistant_masks": mask})
    if examples and len(unusable) > max_unusable_fraction * len(examples):
        raise DataError(
            f"{name}: {len(unusable)} of {len(examples)} examples have no assistant token within the first "
            f"{max_length} tokens (max_length), leaving nothing to learn (lines {_lines(unusable)}); "
            "raise max_length or shorten the context before the first reply"
        )
    return PreparedSupervised(
        dataset=Dataset.from_list(rows),
        n_examples=len(rows),
        n_truncated=n_truncated,
        n_unusable=len(unusable),
        unusable_lines=unusable,
        n_tokens=n_tokens,
        n_loss_tokens=n_loss,
    )


def describe_skipped(prepared: PreparedSupervised, max_length: int, name: str = "training file") -> str | None:
    """A warning for the job's events, or None when every example fits."""
    parts = []
    if prepared.n_unusable:
        parts.append(
            f"{prepared.n_unusable} examples skipped: no assistant token within max_length={max_length} "
            f"(lines {_lines(prepared.unusable_lines)})"
        )
    if prepared.n_truncated:
        parts.append(f"{prepared.n_truncated} examples truncated to max_length={max_length}")
    return f"{name}: " + "; ".join(parts) if parts else None


def sft_args(cfg: TrainingConfig, out: Path, *, evaluate: bool) -> Any:
    """TRL ``SFTConfig`` for the resolved recipe: the same schedule, checkpoints, precision and reporting
    settings as the preference stage's ``DPOConfig`` (``preference.dpo_args``); the loss mask comes with the data
    (``assistant_masks``), so TRL's own ``assistant_only_loss`` / ``completion_only_loss`` stay off; no
    packing (each example is one sequence, as in the handbook's SFT recipe)."""
    from trl import SFTConfig

    from worker.training.arguments import shared_arguments

    return SFTConfig(
        **shared_arguments(cfg, out, evaluate=evaluate),
        truncation_mode="keep_start",
        packing=False,
        assistant_only_loss=False,  # the mask is in the data (see the module docstring)
        completion_only_loss=False,
        dataset_num_proc=None,
    )


def build_sft_trainer(
    model: Any,
    tokenizer: Any,
    args: Any,
    *,
    peft_config: Any,
    train_dataset: Any,
    eval_dataset: Any,
    callbacks: list[Any],
) -> Any:
    """TRL ``SFTTrainer`` with the LoRA adapter and the run's callbacks."""
    from trl import SFTTrainer

    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )


def build_supervised_trainer(
    request: TrainRequest, reporter: Reporter, flag: Any, cfg: TrainingConfig, template: str, tokenizer: Any, out: Path
) -> tuple[Any, Any, int]:
    """Steps 2-4 for supervised: conversations tokenized with assistant masks (``sft.py``), the model, TRL's
    ``SFTTrainer`` with the same LoRA set-up and callbacks as the preference stage."""
    from worker.training.callbacks import NonFiniteGuard, ReportingCallback, StopCallback, TokenCountInLogHistory
    from worker.training.loading import load_model, lora_config

    train_data = load_supervised_data(request.train_file, tokenizer, max_length=cfg.max_length)
    eval_data = None
    if request.validation_file:
        eval_data = load_supervised_data(
            request.validation_file, tokenizer, max_length=cfg.max_length, name="validation file"
        )
    cfg = cfg.model_copy(update={"chat_template": template})
    reporter.resolved(cfg.resolved_dict())
    for prepared, name in ((train_data, "training file"), (eval_data, "validation file")):
        warning = describe_skipped(prepared, cfg.max_length, name) if prepared else None
        if warning:
            reporter.event(warning, level="warn")
    model = load_model(request.model_path, cfg, request.parent_adapters)
    reporting = ReportingCallback(reporter, total_steps=cfg.total_steps, beta=cfg.beta, loss_type=cfg.loss_type)
    trainer = build_sft_trainer(
        model,
        tokenizer,
        sft_args(cfg, out, evaluate=eval_data is not None),
        peft_config=lora_config(cfg),
        train_dataset=train_data.dataset,
        eval_dataset=eval_data.dataset if eval_data else None,
        callbacks=[reporting, TokenCountInLogHistory(reporting), StopCallback(flag), NonFiniteGuard(reporting)],
    )
    return trainer, reporting, train_data.n_examples


def _lines(lines: list[int], limit: int = 10) -> str:
    shown = ", ".join(str(n) for n in lines[:limit])
    return shown + (f" and {len(lines) - limit} more" if len(lines) > limit else "")
