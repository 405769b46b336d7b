"""``/v1/models``: allow-listed base models and the caller project's fine-tuned models.

Fine-tuned model ids contain ``:`` (``ft:tiny-mistral:ipo:ftjob-...``), which a path segment carries as is.
"""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import Ctx, CurrentCaller, DbSession
from app.routes.params import ModelId
from app.schemas.objects import DeletedObject, ErrorResponse, ModelList, ModelObject
from app.services import model_catalog
from app.services.model_catalog import ModelEntry

router = APIRouter(
    prefix="/v1/models",
    tags=["models"],
    responses={
        400: {"model": ErrorResponse},
        401: {"model": ErrorResponse},
        404: {"model": ErrorResponse},
        429: {"model": ErrorResponse},
    },
)


def _view(entry: ModelEntry) -> ModelObject:
    return ModelObject(id=entry.id, created=entry.created, owned_by=entry.owned_by, **entry.description)


@router.get("", response_model=ModelList)
def list_models(ctx: Ctx, session: DbSession, caller: CurrentCaller) -> ModelList:
    entries = model_catalog.list_models(session, caller.project_id, ctx.settings.resolved_models_dir)
    return ModelList(data=[_view(e) for e in entries])


@router.get("/{model_id}", response_model=ModelObject)
def retrieve_model(ctx: Ctx, session: DbSession, caller: CurrentCaller, model_id: ModelId) -> ModelObject:
    return _view(model_catalog.get_model(session, caller.project_id, ctx.settings.resolved_models_dir, model_id))


@router.delete("/{model_id}", response_model=DeletedObject, responses={403: {"model": ErrorResponse}})
def delete_model(ctx: Ctx, session: DbSession, caller: CurrentCaller, model_id: ModelId) -> DeletedObject:
    deleted = model_catalog.delete_model(session, caller.project_id, ctx.settings.resolved_models_dir, model_id)
    return DeletedObject(id=deleted, object="model", deleted=True)
