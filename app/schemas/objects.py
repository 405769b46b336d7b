"""Response objects in OpenAI's shapes: file, fine_tuning.job, fine_tuning.job.event, checkpoint, list."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Generic, Literal, Self, TypeVar

from pydantic import BaseModel

T = TypeVar("T")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str
    status_details: str | None = None
    expires_at: int | None = None


class DeletedObject(BaseModel):
    """OpenAI's answer to a DELETE: ``{"id", "object": "file" | "model", "deleted": true}``."""

    id: str
    object: str
    deleted: bool


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    """``system`` for allow-listed base models, the project id for its fine-tuned models."""
    # Extensions (not in OpenAI's object; its SDK keeps them as extra attributes). For a fine-tuned model
    # they describe its base model. Read from config.json, the safetensors headers and the tokenizer
    # files (contracts/model_info.py: describe_model); null when the files do not say.
    architecture: str | None = None
    """The model class ``config.json`` names, e.g. ``LlamaForCausalLM``."""
    parameters: int | None = None
    """Stored weights (tied weights once), from the safetensors headers."""
    context_length: int | None = None
    """``max_position_embeddings``: the longest sequence in tokens."""
    chat_template: bool | None = None
    """Whether the tokenizer carries a chat template (jobs on a model without one need ``chat_template``)."""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class HealthStatus(BaseModel):
    status: str


class ReadyStatus(BaseModel):
    status: str
    checks: dict[str, str]


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class JobHyperparameters(BaseModel):
    """OpenAI's top-level ``hyperparameters`` (kept for old clients); the full set is under ``method``."""

    batch_size: int | Literal["auto"] = "auto"
    learning_rate_multiplier: float | Literal["auto"] = "auto"
    n_epochs: int | Literal["auto"] = "auto"


class JobLineage(BaseModel):
    """ipo-align extension: where a job started. ``model`` is what the caller sent (a base model, or a
    fine-tuned model or checkpoint); ``base_model`` is the allow-listed model at the root of the chain."""

    base_model: str
    parent_job_id: str | None = None
    """The job whose adapter was merged into the base before this job's adapter was trained."""
    parent_checkpoint_id: str | None = None
    """Set when the start was one of the parent's checkpoints rather than its final adapter."""
    from_checkpoint: str | None = None
    """Warm start: the checkpoint whose adapter weights this job's adapter started from. The optimiser state
    is not reused (``optimizer_state``)."""
    optimizer_state: Literal["fresh", "resumed"] | None = None
    """For a warm start: ``fresh`` (a new optimiser and schedule over the checkpoint's weights). A job's own
    pause/resume or retry continues its own checkpoints with their optimiser state, as always."""


class JobObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None = None
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    hyperparameters: JobHyperparameters
    model: str
    organization_id: str
    result_files: list[str]
    seed: int
    status: str
    trained_tokens: int | None = None
    training_file: str
    validation_file: str | None = None
    integrations: list[dict[str, Any]] = []
    """The job's trackers as created (``contracts.integrations``): ``wandb`` (OpenAI) and ``mlflow``."""
    metadata: dict[str, str] | None = None
    method: dict[str, Any]
    estimated_finish: int | None = None
    user_provided_suffix: str | None = None
    # ipo-align extensions
    resolved_hyperparameters: dict[str, Any] | None = None
    attempt: int = 0
    lineage: JobLineage | None = None
    step: int | None = None
    total_steps: int | None = None
    n_gpus: int = 1
    """Devices the job trains on at once (data-parallel; docs/multi-gpu.md)."""


class EventObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    type: str
    data: dict[str, Any] | None = None


class CheckpointObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: dict[str, Any]
    step_number: int
    file_id: str


class ListObject(BaseModel, Generic[T]):
    """OpenAI's cursor page: ``data`` in the list's order, ``first_id``/``last_id`` its ends' ids (the
    ``after`` of the next page is ``last_id``), ``has_more`` whether another page follows."""

    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None

    @classmethod
    def page(cls, data: Sequence[T], has_more: bool) -> Self:
        """The page holding ``data`` (objects with an ``id``), ``first_id``/``last_id`` filled in."""
        ids = [str(item.id) for item in data]  # type: ignore[attr-defined]
        return cls(
            data=list(data), has_more=has_more, first_id=ids[0] if ids else None, last_id=ids[-1] if ids else None
        )


class WebhookEndpointObject(BaseModel):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    url: str
    events: list[str] | None = None
    """The event types delivered here; null means all of them."""
    description: str | None = None
    status: str
    """``active``, or ``failing`` after repeated failed deliveries (it still gets deliveries)."""
    created_at: int
    secret: str | None = None
    """``whsec_...``: only in the answer to the create request. Verify deliveries with it."""


class WebhookDeliveryObject(BaseModel):
    id: str
    object: Literal["webhook_delivery"] = "webhook_delivery"
    event_id: str
    event_type: str
    status: str
    """``pending``, ``succeeded`` or ``failed`` (every retry failed)."""
    attempts: int
    response_status_code: int | None = None
    last_error: str | None = None
    created_at: int
    last_attempt_at: int | None = None
    next_attempt_at: int | None = None
    delivered_at: int | None = None
