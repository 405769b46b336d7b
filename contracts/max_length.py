"""``max_length`` resolved from a job's ``method`` and the model's config: one function, used by the API
at job creation (to check prompt lengths against the value the job will really train with) and by the
worker's recipe (``worker/training/recipe.py``), so ``"auto"`` means the same number in both.

Defaults: the seed recipe's 1024 tokens (alignment-handbook ``recipes/zephyr-7b-beta/dpo/
config_qlora.yaml``: ``max_length: 1024``), and 64 for the demo-sized models (hidden size <= 512 and at
most 8 layers: the tiny model's preset, ``TINY_IPO``), capped at the model's positions
(``max_position_embeddings``). An explicit value over the positions is an error, not capped.
"""

from __future__ import annotations

from typing import Any, Literal

RECIPE_MAX_LENGTH = 1024
"""handbook: max_length 1024."""
SFT_MAX_LENGTH = 2048
"""Supervised jobs: alignment-handbook ``recipes/zephyr-7b-beta/sft/config_qlora.yaml``: ``max_length: 2048``."""
TINY_MAX_LENGTH = 64
"""The tiny demo model's preset (its demo pairs are under 64 tokens; see worker/training/recipe.py)."""


class MaxLengthError(ValueError):
    """An explicit ``max_length`` the model cannot take."""


def is_tiny_model(model_config_dict: dict[str, Any]) -> bool:
    """The demo-sized models that get the tiny presets: hidden size <= 512 and at most 8 layers."""
    return (
        int(model_config_dict.get("hidden_size", 4096)) <= 512
        and int(model_config_dict.get("num_hidden_layers", 32)) <= 8
    )


def fit_max_length(max_length: int, *, explicit: bool, model_config_dict: dict[str, Any]) -> int:
    """``max_length`` capped at the model's positions; an explicit value over them raises ``MaxLengthError``."""
    max_positions = model_config_dict.get("max_position_embeddings")
    if not isinstance(max_positions, int) or max_positions <= 0:
        return max_length
    if explicit and max_length > max_positions:
        raise MaxLengthError(f"{max_length} exceeds the model's {max_positions} positions")
    return min(max_length, max_positions)


def resolve_max_length(
    requested: int | Literal["auto"], model_config_dict: dict[str, Any], method_type: str = "ipo"
) -> int:
    """The tokens of prompt + reply a job trains with: ``requested``, or for ``"auto"`` the model's default
    (``TINY_MAX_LENGTH``, else ``RECIPE_MAX_LENGTH``, or ``SFT_MAX_LENGTH`` for a supervised job), capped at
    its positions. Raises ``MaxLengthError``."""
    if requested == "auto":
        recipe = SFT_MAX_LENGTH if method_type == "supervised" else RECIPE_MAX_LENGTH
        default = TINY_MAX_LENGTH if is_tiny_model(model_config_dict) else recipe
        return fit_max_length(default, explicit=False, model_config_dict=model_config_dict)
    return fit_max_length(int(requested), explicit=True, model_config_dict=model_config_dict)
