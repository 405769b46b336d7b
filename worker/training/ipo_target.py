"""A warning for IPO settings that tend to wreck the model rather than align it: a far per-token margin
target (small ``beta``) with a LoRA-sized learning rate.

TRL's IPO loss is ``(h - 1/(2*beta))**2`` where ``h`` is the chosen-minus-rejected log-ratio gap averaged over
each reply's tokens, so ``1/(2*beta)`` is a target in nats *per token*. The Zephyr recipe's ``beta`` 0.01 (50
nats) is safe at its learning rate 5e-6 and one pass because training never gets near the target; at LoRA
rates (1e-4 and up) it does, and the cheapest way there is to make the rejected replies' own wording
unlikely, which drags the model away from its answers. Measured here (``worker/training/answer_format.py``,
``recipe.py``'s tiny preset): on SmolLM2-135M-Instruct at lr 2e-4, ``beta`` 0.1 (5 nats) left 2 of 13 held-out
answers correct and none in the preferred format, ``beta`` 0.5 (1 nat) 13 of 13 in the format; the tiny model
at lr 1e-3 needed 0.5 as well. The warning is advice in the job's events; the job trains as asked.
"""

from __future__ import annotations

from worker.training.recipe import TrainingConfig

FAR_TARGET_NATS = 5.0
"""Per-token margin target ``1/(2*beta)`` from which the warning applies: ``beta`` <= 0.1 (TRL's and OpenAI's
DPO default, which users carry over), the value measured to wreck SmolLM2-135M-Instruct at lr 2e-4."""

LORA_SIZED_LR = 1e-4
"""Learning rate from which the warning applies: LoRA-sized (the handbook's SFT 2e-4, the tiny preset's 1e-3),
20x the IPO recipe's 5e-6, at which the measured runs reached their target."""


def far_target_warning(cfg: TrainingConfig, learning_rate_auto: bool = False) -> tuple[str, dict[str, float]] | None:
    """The warning for ``cfg`` (resolved, concrete) and its figures (``beta``, ``ipo_margin_target``,
    ``learning_rate``: the event's ``data``), or ``None`` when it does not apply: not IPO, a target under
    ``FAR_TARGET_NATS`` or a learning rate under ``LORA_SIZED_LR``. ``learning_rate_auto``: the job left
    ``learning_rate`` to the preset, which the message says (the user did not pick that rate)."""
    if cfg.loss_type != "ipo" or cfg.beta <= 0:
        return None
    target = 1 / (2 * cfg.beta)
    if target < FAR_TARGET_NATS or cfg.learning_rate < LORA_SIZED_LR:
        return None
    rate = f"learning_rate {cfg.learning_rate:g}" + (" (auto: this model's preset)" if learning_rate_auto else "")
    message = (
        f"beta {cfg.beta:g} sets IPO's margin target 1/(2*beta) at {target:g} nats per token, far for {rate}. "
        "IPO's beta is not DPO's (0.1 is DPO's default): at such rates IPO tends to reach its target by making "
        "the rejected replies' own wording unlikely, and the model drifts from its answers (measured on "
        "SmolLM2-135M-Instruct at learning_rate 2e-4: beta 0.1 kept 2 of 13 held-out answers correct, beta 0.5 "
        "all 13). Consider method.ipo.hyperparameters.beta 0.3-1.0 at this rate, or a learning_rate near 5e-6 "
        "(the Zephyr recipe's, for beta 0.01); the samples and margin metrics show whether it drifts."
    )
    return message, {"beta": cfg.beta, "ipo_margin_target": target, "learning_rate": cfg.learning_rate}
