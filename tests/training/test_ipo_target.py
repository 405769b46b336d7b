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
    advice = far_target_warning(cfg)
    assert (advice is not None) == warns, advice
    if advice is not None:
        message, figures = advice
        assert f"{1 / (2 * beta):g} nats per token" in message and f"learning_rate {lr:g}." in message
        assert "method.ipo.hyperparameters.beta" in message
        assert figures == {"beta": beta, "ipo_margin_target": 1 / (2 * beta), "learning_rate": lr}


def test_the_warning_says_when_the_rate_came_from_the_preset() -> None:
    advice = far_target_warning(TrainingConfig(beta=0.1, learning_rate=1e-3), learning_rate_auto=True)
    assert advice is not None and "learning_rate 0.001 (auto: this model's preset)" in advice[0]
