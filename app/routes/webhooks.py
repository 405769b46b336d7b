"""``/v1/webhooks``: a project's webhook endpoints (create shows the signing secret once) and delivery logs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request

from app.deps import Ctx, CurrentCaller, DbSession, IdempotencyKeyHeader
from app.routes.idempotent import run_idempotent
from app.routes.params import Cursor
from app.schemas.objects import DeletedObject, ErrorResponse, ListObject, WebhookDeliveryObject, WebhookEndpointObject
from app.schemas.requests import ID_PATTERN, WebhookCreate
from app.services import idempotency
from app.services import webhooks as webhooks_service
from app.services.views import webhook_delivery_view, webhook_endpoint_view
from app.services.webhook_targets import TargetPolicy

router = APIRouter(
    prefix="/v1/webhooks",
    tags=["webhooks"],
    responses={
        400: {"model": ErrorResponse},
        401: {"model": ErrorResponse},
        404: {"model": ErrorResponse},
        429: {"model": ErrorResponse},
    },
)

WebhookId = Annotated[str, Path(max_length=64, pattern=ID_PATTERN)]
Limit = Annotated[int, Query(ge=1, le=100)]


def _self_addresses(request: Request) -> list[tuple[str, int]]:
    """How clients reach this service (Host header) and where it listens: a webhook may point at neither."""
    addresses = []
    default = 443 if request.url.scheme == "https" else 80
    if request.url.hostname:
        addresses.append((request.url.hostname, request.url.port or default))
    server = request.scope.get("server")
    if server and server[0] and server[1]:
        addresses.append((str(server[0]), int(server[1])))
    return addresses


@router.post("", response_model=WebhookEndpointObject)
def create_webhook(
    ctx: Ctx,
    session: DbSession,
    caller: CurrentCaller,
    request: Request,
    body: WebhookCreate,
    idempotency_key: IdempotencyKeyHeader,
) -> WebhookEndpointObject:
    def produce() -> WebhookEndpointObject:
        row = webhooks_service.create_endpoint(
            session,
            caller.project_id,
            url=body.url,
            events=body.events,
            description=body.description,
            self_addresses=_self_addresses(request),
            policy=TargetPolicy.from_settings(ctx.settings),
        )
        return webhook_endpoint_view(row, with_secret=True)

    fingerprint = idempotency.request_fingerprint("POST", "/v1/webhooks", body.model_dump(mode="json"))
    return run_idempotent(ctx, session, caller, idempotency_key, fingerprint, produce)  # type: ignore[no-any-return]


@router.get("", response_model=ListObject[WebhookEndpointObject])
def list_webhooks(session: DbSession, caller: CurrentCaller) -> ListObject[WebhookEndpointObject]:
    rows = webhooks_service.list_endpoints(session, caller.project_id)
    return ListObject[WebhookEndpointObject].page([webhook_endpoint_view(r) for r in rows], has_more=False)


@router.get("/{webhook_id}", response_model=WebhookEndpointObject)
def retrieve_webhook(session: DbSession, caller: CurrentCaller, webhook_id: WebhookId) -> WebhookEndpointObject:
    return webhook_endpoint_view(webhooks_service.get_endpoint(session, caller.project_id, webhook_id))


@router.delete("/{webhook_id}", response_model=DeletedObject)
def delete_webhook(session: DbSession, caller: CurrentCaller, webhook_id: WebhookId) -> DeletedObject:
    webhooks_service.delete_endpoint(session, caller.project_id, webhook_id)
    return DeletedObject(id=webhook_id, object="webhook_endpoint", deleted=True)


@router.get("/{webhook_id}/deliveries", response_model=ListObject[WebhookDeliveryObject])
def list_deliveries(
    session: DbSession, caller: CurrentCaller, webhook_id: WebhookId, after: Cursor = None, limit: Limit = 20
) -> ListObject[WebhookDeliveryObject]:
    rows, has_more = webhooks_service.list_deliveries(session, caller.project_id, webhook_id, after=after, limit=limit)
    return ListObject[WebhookDeliveryObject].page([webhook_delivery_view(r) for r in rows], has_more)
