"""The private TRL / transformers methods ``IpoDPOTrainer`` overrides still exist upstream, with the
parameters the overrides expect (a rename would silently bypass an override; see worker/training/trainer.py)."""

from __future__ import annotations

import inspect

import pytest
from trl import DPOTrainer

from worker.training.trainer import IpoDPOTrainer

OVERRIDES = ("_prepare_dataset", "_precompute_ref_logps", "_get_train_sampler", "_get_eval_sampler", "_compute_loss")
"""Every private method ``IpoDPOTrainer`` defines itself (checked below to be the complete list)."""
ATTRIBUTES_READ = ("_metrics", "precompute_ref_logps", "compute_ref_log_probs", "data_collator")


@pytest.mark.parametrize("name", OVERRIDES)
def test_each_override_replaces_a_method_of_the_same_shape(name: str) -> None:
    base = getattr(DPOTrainer, name, None)
    assert base is not None, f"DPOTrainer.{name} no longer exists: IpoDPOTrainer.{name} would never be called"
    ours = inspect.signature(getattr(IpoDPOTrainer, name))
    theirs = inspect.signature(base)
    assert list(ours.parameters) == list(theirs.parameters), f"{name}: upstream parameters changed to {theirs}"


def test_the_list_of_overrides_is_complete() -> None:
    """Every private method of ours that shadows one of DPOTrainer's is listed (and so checked above)."""
    own = {n for n, v in vars(IpoDPOTrainer).items() if n.startswith("_") and not n.startswith("__") and callable(v)}
    assert {n for n in own if hasattr(DPOTrainer, n)} == set(OVERRIDES)


def test_attributes_the_overrides_read_are_still_set_by_trl() -> None:
    source = inspect.getsource(DPOTrainer)
    for name in ATTRIBUTES_READ:
        assert f"self.{name}" in source or hasattr(DPOTrainer, name), f"DPOTrainer no longer has {name}"
