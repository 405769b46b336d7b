"""When the trainer warns that IPO's per-token margin target is far for the learning rate (and when not)."""

from __future__ import annotations

import pytest

from worker.training.ipo_target import far_target_warning
from worker.training.recipe import TINY_IPO, ZEPHYR_IPO, TrainingConfig


@pytest.mark.parametrize(
    ("loss_type", "beta", "lr", "warns"),
    [
        ("ipo", ZEPHYR_IPO["beta"], ZEPHYR_IPO["learning_rate"], False),  # the recipe: 50 nats at 5e-6
        ("ipo", TINY_IPO["beta"], TINY_IPO["learning_rate"], False),  # the tiny preset: 1 nat at 1e-3
        ("ipo", 0.1, 2e-4, True),  # what wrecked SmolLM2-135M-Instruct
        ("ipo", 0.01, 1e-4, True),  # the recipe's beta at a LoRA rate
        ("ipo", 0.1, 9e-5, False),  # under the LoRA-sized rate
        ("ipo", 0.11, 1e-3, False),  # a target under 5 nats
        ("sigmoid", 0.1, 2e-4, False),  # DPO's beta is a temperature, not a target
        ("sft", 0.0, 1e-3, False),
    ],
)
def test_far_target_warning(loss_type: str, beta: float, lr: float, warns: bool) -> None:
    cfg = TrainingConfig(loss_type=loss_type, beta=beta, learning_rate=lr)
    warning = far_target_warning(cfg)
    assert (warning is not None) == warns, warning
    if warning is not None:
        assert f"{1 / (2 * beta):g} nats per token" in warning and f"learning_rate {lr:g}" in warning
