"""``IpoDPOTrainer``: TRL's ``DPOTrainer`` plus the per-token IPO metrics, length-grouped batches and a
reference pass made once per dataset.

- Metrics: the *true per-token* IPO margin ``Δchosen/n_chosen - Δrejected/n_rejected`` (Δ = policy -
  reference log-likelihood of the reply) and the preference accuracy (fraction of pairs with a positive
  per-token margin). TRL's ``rewards/*`` use summed log-probs, so they are not what IPO's loss drives
  towards ``1/(2·beta)``.
- Batching: with ``train_sampling_strategy="group_by_length"`` the training order comes from
  ``batching.SeededLengthGroupedSampler`` and evaluation runs longest-first (see ``batching``).
- Reference log-probs: with ``precompute_ref_log_probs=True`` the reference (the base model: the
  adapter disabled) scores every pair once, before training, in length-sorted batches, instead of a
  second forward pass in every step. Datasets that already carry the columns (from ``ref_cache``) are
  taken as they are, and so are datasets that are already tokenized.

Overrides of private TRL / transformers methods (tested with trl 1.16, transformers 5.24; a rename or a
changed signature upstream is caught by ``tests/training/test_trl_overrides.py``, which checks each name
and its parameters on the installed base classes, and a changed behaviour by the test named here):

- ``DPOTrainer._prepare_dataset``: skip TRL's tokenizing for already-tokenized (cached) data.
  Behaviour: ``test_fast_paths.py::test_a_second_run_on_the_same_file_uses_the_cache_and_learns_the_same``.
- ``DPOTrainer._precompute_ref_logps``: the reference pass, longest-first and reusing cached columns.
  Behaviour: ``test_fast_paths.py::test_precomputed_reference_trains_exactly_like_the_per_step_one`` and
  ``::test_precomputed_reference_is_the_base_model``.
- ``Trainer._get_train_sampler`` / ``Trainer._get_eval_sampler``: seeded length-grouped training order,
  longest-first evaluation. Behaviour: ``test_fast_paths.py::test_length_grouped_run_resumes_exactly_across_epochs``
  and tests/unit/test_length_grouping.py.
- ``DPOTrainer._compute_loss``: wrapped (not replaced) to capture per-token log-probs for the IPO margin;
  also reads ``self._metrics`` and ``self.precompute_ref_logps``. Behaviour:
  ``test_train.py::test_train_reports_checkpoints_and_adapter`` (ipo_margin, preference_accuracy present).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from datasets import Dataset
from torch.utils.data import DataLoader
from trl import DPOTrainer

from worker.training.batching import PAIR_COLUMNS, LongestFirstSampler, SeededLengthGroupedSampler, pair_lengths

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def _has_columns(dataset: Any, columns: tuple[str, ...]) -> bool:
    return isinstance(dataset, Dataset) and set(columns) <= set(dataset.column_names)


class IpoDPOTrainer(DPOTrainer):
    """``DPOTrainer`` with per-token IPO metrics, length grouping and a once-per-dataset reference pass.

    The policy and reference forwards of ``DPOTrainer._compute_loss`` both go through the (PEFT) model,
    policy first, then reference with the adapter disabled; a forward hook captures their per-token
    log-probs, and the margin is computed over exactly the completion tokens TRL's IPO loss uses. With
    precomputed reference log-probs only the policy forward runs and the reference sums come with the batch.
    """

    ref_logps_seconds: float = 0.0
    """Time spent computing reference log-probs before training (0 when they came from the cache)."""
    ref_logps_pairs: int = 0

    # -- data -----------------------------------------------------------------------------------------------

    @property
    def _max_length(self) -> int | None:
        return getattr(self.args, "max_length", None)  # DPOConfig's; mypy sees TrainingArguments

    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        if _has_columns(dataset, PAIR_COLUMNS):
            return dataset  # tokenized already (the cache of an earlier run): TRL would tokenize it again
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        """The reference's summed completion log-probs of every pair, as TRL's ``compute_ref_log_probs`` makes
        them (adapter disabled, no grad), but longest-first so that each batch pads little."""
        if _has_columns(dataset, REF_COLUMNS):
            return dataset
        if not isinstance(dataset, Dataset):
            return super()._precompute_ref_logps(dataset, name, batch_size)  # TRL's error for iterable data
        started = time.monotonic()
        lengths = pair_lengths(dataset, self._max_length)
        sampler = LongestFirstSampler(lengths)
        order = list(sampler)
        loader = DataLoader(
            dataset.select_columns(list(PAIR_COLUMNS)),
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=0,
        )
        chosen = torch.zeros(len(dataset), dtype=torch.float32)
        rejected = torch.zeros(len(dataset), dtype=torch.float32)
        model = self.ref_model or self.model
        done = 0
        for batch in loader:
            batch = {k: v.to(self.accelerator.device) for k, v in batch.items()}
            ref_chosen, ref_rejected = self.compute_ref_log_probs(model, batch)
            rows = torch.tensor(order[done : done + len(ref_chosen)])
            chosen[rows] = ref_chosen.detach().float().cpu()
            rejected[rows] = ref_rejected.detach().float().cpu()
            done += len(ref_chosen)
        dataset = dataset.add_column(REF_COLUMNS[0], chosen.tolist())
        dataset = dataset.add_column(REF_COLUMNS[1], rejected.tolist())
        self.ref_logps_seconds += time.monotonic() - started
        self.ref_logps_pairs += len(order)
        return dataset

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy != "group_by_length" or not _has_columns(dataset, PAIR_COLUMNS):
            return super()._get_train_sampler(train_dataset)
        return SeededLengthGroupedSampler(
            pair_lengths(dataset, self._max_length),
            # the global batch: every process draws from the same order, so a step sees the pairs one process
            # would see with n times the batch (accelerate hands each process every n-th micro-batch)
            batch_size=self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size,
            seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
        )

    def _get_eval_sampler(self, eval_dataset: Any) -> Any:
        if self.args.train_sampling_strategy != "group_by_length" or not _has_columns(eval_dataset, PAIR_COLUMNS):
            return super()._get_eval_sampler(eval_dataset)
        return LongestFirstSampler(pair_lengths(eval_dataset, self._max_length))

    # -- metrics --------------------------------------------------------------------------------------------

    def _compute_loss(self, model: Any, inputs: dict[str, torch.Tensor], return_outputs: bool) -> Any:
        captured: list[torch.Tensor] = []

        def hook(module: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            log_probs = getattr(output, "log_probs", None)
            if log_probs is not None:
                captured.append(log_probs.detach())

        handle = self.accelerator.unwrap_model(self.model).register_forward_hook(hook, with_kwargs=True)
        try:
            result = super()._compute_loss(model, inputs, return_outputs)
        finally:
            handle.remove()
        mask = inputs["completion_mask"][..., 1:].bool()
        if self.precompute_ref_logps and captured:
            ref_sums = torch.cat([inputs[REF_COLUMNS[0]], inputs[REF_COLUMNS[1]]]).float()
            self._log_per_token_metrics(captured[0], ref_sums, mask)
        elif len(captured) >= 2:
            self._log_per_token_metrics(captured[0], _masked_sums(captured[1], mask), mask)
        return result

    def _log_per_token_metrics(self, policy: torch.Tensor, ref_sums: torch.Tensor, mask: torch.Tensor) -> None:
        mode = "train" if self.model is not None and self.model.training else "eval"
        n_tokens = mask.sum(1).clamp(min=1)
        policy_sums = _masked_sums(policy, mask)
        delta = (policy_sums - ref_sums.to(policy_sums.device)) / n_tokens
        mean_logp = policy_sums / n_tokens
        delta_chosen, delta_rejected = delta.chunk(2)
        logp_chosen, logp_rejected = mean_logp.chunk(2)
        margin = self.accelerator.gather_for_metrics(delta_chosen - delta_rejected)
        likelihood_win = self.accelerator.gather_for_metrics((logp_chosen > logp_rejected).float())
        self._metrics[mode]["ipo/margin"].append(margin.mean().item())
        self._metrics[mode]["ipo/accuracy"].append((margin > 0).float().mean().item())
        self._metrics[mode]["ipo/likelihood_accuracy"].append(likelihood_win.mean().item())
        self._metrics[mode]["ipo/chosen_logp_per_token"].append(
            self.accelerator.gather_for_metrics(logp_chosen).mean().item()
        )


def _masked_sums(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of per-token log-probs over the completion tokens (``mask``: the shifted completion mask)."""
    values = per_token[:, -mask.size(1) :].float()
    return torch.where(mask, values, torch.zeros_like(values)).sum(1)
