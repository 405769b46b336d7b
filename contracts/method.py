"""The ``method`` block of a fine-tuning job, as users send it (OpenAI's shape, types ``ipo``, ``dpo`` and
``supervised``).

Validated at job creation by the API; resolved into a concrete ``TrainingConfig`` by the worker
(``worker/training/recipe.py``), where every ``"auto"`` becomes a number and every default is documented.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, model_validator

from contracts.graders import Grader

Auto = Literal["auto"]
PositiveFloat = Annotated[StrictFloat, Field(gt=0)]


class _Strict(BaseModel):
    """Unknown fields are refused, and numbers are strict (``StrictFloat``/``StrictInt``) where OpenAI's
    schema says number/integer: ``true`` or ``"0.1"`` is not a number, ``2.0`` is not an integer; an
    integer is still a number (JSON has one number type)."""

    model_config = ConfigDict(extra="forbid")


class Hyperparameters(_Strict):
    """Every field may be ``"auto"`` (resolved on the worker from the dataset and the model)."""

    beta: Annotated[StrictFloat, Field(gt=0, le=100)] | Auto = "auto"
    """IPO: the paper's tau (regularisation towards the reference). DPO: the sigmoid temperature."""
    n_epochs: Annotated[StrictInt, Field(ge=1, le=100)] | Auto = "auto"
    batch_size: Annotated[StrictInt, Field(ge=1, le=1024)] | Auto = "auto"
    learning_rate: Annotated[StrictFloat, Field(gt=0, le=1.0)] | Auto = "auto"
    learning_rate_multiplier: Annotated[StrictFloat, Field(gt=0, le=100)] | Auto = "auto"
    gradient_accumulation_steps: Annotated[StrictInt, Field(ge=1, le=1024)] | Auto = "auto"
    max_length: Annotated[StrictInt, Field(ge=16, le=131072)] | Auto = "auto"
    warmup_ratio: Annotated[StrictFloat, Field(ge=0, lt=1)] | Auto = "auto"
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] | Auto = "auto"
    sft_weight: Annotated[StrictFloat, Field(ge=0, le=100)] | Auto = "auto"
    """Weight of an added NLL loss on the chosen reply (0 = pure IPO/DPO)."""
    max_steps: Annotated[StrictInt, Field(ge=1, le=10_000_000)] | Auto = "auto"
    """Caps the number of optimiser steps (handy for smoke runs); ``auto`` = n_epochs over the data."""
    checkpoint_every: Annotated[StrictInt, Field(ge=1, le=10_000_000)] | Auto = "auto"
    """Save a resumable checkpoint every N optimiser steps."""


LoraTarget = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.]+$")]


class Lora(_Strict):
    r: Annotated[StrictInt, Field(ge=1, le=1024)] | Auto = "auto"
    alpha: Annotated[StrictFloat, Field(gt=0, le=4096)] | Auto = "auto"
    dropout: Annotated[StrictFloat, Field(ge=0, lt=1)] | Auto = "auto"
    target_modules: Annotated[list[LoraTarget], Field(min_length=1, max_length=32)] | Auto = "auto"
    quantization: Literal["nf4", "none"] | Auto = "auto"
    """``nf4`` = QLoRA (CUDA only); ``none`` = plain LoRA; ``auto`` = nf4 on CUDA, none on CPU."""


class Samples(_Strict):
    """Replies generated during training, at each evaluation and at the end (``worker/training/samples.py``):
    for ``n_prompts`` prompts of the validation file (else prompts held out of the training file, see
    ``holdout``), the reply of the policy and of the reference (adapter disabled), greedy and sampled with the
    job's seed, plus the log-probability of each pair's chosen and rejected reply under both. ``n_prompts=0``
    turns it off. Graders (``contracts/graders.py``) score the greedy replies.

    Defaults are kept small so sampling stays a small share of a run (bench/RESULTS.md)."""

    n_prompts: Annotated[StrictInt, Field(ge=0, le=64)] = 16
    max_new_tokens: Annotated[StrictInt, Field(ge=1, le=512)] = 64
    temperature: Annotated[StrictFloat, Field(gt=0, le=2)] = 1.0
    """Of the sampled replies (the greedy ones have none); top_p/top_k are off."""
    graders: Annotated[list[Grader], Field(max_length=8)] = Field(default_factory=list)
    """Scores of the greedy replies against the chosen reply, reported as metrics per evaluation."""
    holdout: Annotated[StrictInt, Field(ge=0, le=64)] | Auto = "auto"
    """Only without a validation file: how many training prompts (each with all its pairs) are held out of
    training and sampled instead, chosen at random with the job's seed (the job's events name the lines).
    ``auto`` = ``n_prompts``, but at most a tenth of the file's distinct prompts (so at least 10 are needed
    to hold one out); ``0`` = none, and samples then come from prompts the policy trains on. A number must
    leave at least one pair to train on. A count above 0 beside a validation file is refused at job
    creation (400): the validation file's prompts are the ones sampled."""

    @model_validator(mode="after")
    def _unique_grader_names(self) -> Samples:
        names = [g.name for g in self.graders]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"grader names must be unique (their metric keys would collide): {duplicates}")
        return self


class MethodParams(_Strict):
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    lora: Lora = Field(default_factory=Lora)
    chat_template: Annotated[str, Field(min_length=1, max_length=65536)] | Auto = "auto"
    """How conversations are formatted (``contracts/chat_templates.py``): ``auto`` = the model's own
    template, or Zephyr's for a base model without one; a name (``zephyr``, ``chatml``, ``llama-3``,
    ``mistral-instruct``); or a Jinja template string, checked at job creation."""

    samples: Samples = Field(default_factory=Samples)
    """Replies sampled during training (preference methods; ``n_prompts`` 0 for none)."""


PREFERENCE_TYPES = ("ipo", "dpo")
"""Methods trained on preference pairs (``contracts.data_formats``); ``supervised`` trains on
conversations (``contracts.sft_formats``)."""
PREFERENCE_ONLY = ("beta", "sft_weight")
"""Hyperparameters that mean nothing to a supervised job (refused there, with the field named)."""


class Method(_Strict):
    type: Literal["ipo", "dpo", "supervised"] = "ipo"
    ipo: MethodParams | None = None
    dpo: MethodParams | None = None
    supervised: MethodParams | None = None
    """OpenAI's supervised fine-tuning (TRL ``SFTTrainer``); ``beta`` and ``sft_weight`` do not apply."""

    def params(self) -> MethodParams:
        """The parameters block matching ``type`` (an empty one when omitted)."""
        block = {"ipo": self.ipo, "dpo": self.dpo, "supervised": self.supervised}[self.type]
        return block or MethodParams()

    @property
    def is_preference(self) -> bool:
        """True for ``ipo`` and ``dpo`` (trained on preference pairs), False for ``supervised``."""
        return self.type in PREFERENCE_TYPES
