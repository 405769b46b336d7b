"""The JSON-ready views the hot read routes serialise directly (``job_object``, ``event_object``,
``page_object``) are exactly what the pydantic response models dump: same keys, same order, same values,
for every kind of job row; and the cached method view is the validated block's own dump."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from app.models import Job, JobEvent
from app.schemas.objects import EventObject, JobObject, ListObject
from app.services import views
from contracts.method import Method

CREATED = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)

METHODS: list[dict[str, Any]] = [
    {"type": "ipo", "ipo": {"hyperparameters": {"beta": 0.1, "max_steps": 10, "batch_size": 2}}},
    {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.5}, "lora": {"r": 8, "target_modules": ["q_proj"]}}},
    {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "learning_rate_multiplier": 1.5}}},
    {"type": "ipo"},
    {
        "type": "ipo",
        "ipo": {"samples": {"n_prompts": 4, "graders": [{"type": "string_check", "operation": "eq"}]}},
    },
]


def _job(**overrides: Any) -> Job:
    values: dict[str, Any] = {
        "id": "ftjob-" + "1" * 24,
        "project_id": "proj-a",
        "status": "queued",
        "model": "tiny-mistral",
        "training_file": "file-a",
        "seed": 42,
        "method": METHODS[0],
        "attempt": 0,
        "failed_attempts": 0,
        "created_at": CREATED,
    }
    values.update(overrides)
    return Job(**values)


ROWS = [
    _job(),
    _job(method=METHODS[1], job_metadata={"team": "a", "run": "7"}, suffix="mine", validation_file="file-v"),
    _job(
        status="succeeded",
        method=METHODS[2],
        resolved_hyperparameters={"batch_size": 4, "n_epochs": 2, "learning_rate": 2e-4, "beta": 0.1},
        fine_tuned_model="ft:tiny-mistral:mine:ftjob-1",
        result_files=["file-r1", "file-r2"],
        trained_tokens=12345,
        step=20,
        total_steps=20,
        attempt=2,
        finished_at=CREATED + timedelta(minutes=5),
        estimated_finish=1_800_000_000,
        integrations=[{"type": "wandb", "wandb": {"project": "p"}}],
    ),
    _job(
        status="failed",
        error={"code": "training_failed", "message": "boom", "param": None},
        finished_at=CREATED.replace(tzinfo=None),  # SQLite hands back naive times
    ),
    _job(
        method=METHODS[4],
        base_model="tiny-mistral",
        model="ft:tiny-mistral:x:ftjob-0",
        parent_job_id="ftjob-" + "0" * 24,
        parent_checkpoint_id="ftckpt-0",
        from_checkpoint_id="ftckpt-0",
    ),
    _job(method=METHODS[3], resolved_hyperparameters={}),
]


@pytest.mark.parametrize("row", ROWS, ids=range(len(ROWS)))
def test_job_object_is_the_job_models_dump(row: Job) -> None:
    data = views.job_object(row)
    dumped = views.job_view(row).model_dump(mode="json")
    assert data == dumped and list(data) == list(dumped) == list(JobObject.model_fields)
    assert json.loads(json.dumps(data)) == data  # JSON-ready as it is


def test_the_cached_method_view_is_the_validated_blocks_dump() -> None:
    views._method_views.clear()
    for _ in range(2):  # a miss, then hits
        for block in METHODS:
            shown, hp = views._method_view(block)
            method = Method.model_validate(block)
            assert shown == method.model_dump(mode="json", exclude_none=True)
            params = method.params().hyperparameters
            assert (hp.batch_size, hp.learning_rate_multiplier, hp.n_epochs) == (
                params.batch_size,
                params.learning_rate_multiplier,
                params.n_epochs,
            )
    assert len(views._method_views) == len(METHODS)
    same_but_reordered = {"ipo": {"hyperparameters": {"batch_size": 2, "max_steps": 10, "beta": 0.1}}, "type": "ipo"}
    assert views._method_view(same_but_reordered)[0] is views._method_view(METHODS[0])[0]
    assert len(views._method_views) == len(METHODS)


def test_the_method_view_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(views, "METHOD_VIEWS_MAX", 3)
    views._method_views.clear()
    for steps in range(1, 8):
        views._method_view({"type": "ipo", "ipo": {"hyperparameters": {"max_steps": steps}}})
        assert len(views._method_views) <= 3


def test_event_and_page_objects_are_the_models_dumps() -> None:
    events = [
        JobEvent(id=7, job_id="ftjob-1", project_id="proj-a", level="info", message="Job created", type="message"),
        JobEvent(
            id=9,
            job_id="ftjob-1",
            project_id="proj-a",
            level="warn",
            message="step 3",
            type="metrics",
            data={"step": 3, "train_loss": 0.5},
        ),
    ]
    for e in events:
        e.created_at = CREATED
        assert views.event_object(e) == views.event_view(e).model_dump(mode="json")
        assert list(views.event_object(e)) == list(EventObject.model_fields)
    for data, has_more in (([], False), ([views.event_object(e) for e in events], True)):
        page = views.page_object(data, has_more)
        model = ListObject[EventObject].page([EventObject.model_validate(d) for d in data], has_more)
        assert page == model.model_dump(mode="json") and list(page) == list(ListObject.model_fields)
