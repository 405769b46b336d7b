"""Webhook endpoints (per project) and ``emit``: the delivery rows written with the state change.

Events follow OpenAI's fine-tuning webhook names; payloads are ``{"id": "evt_...", "type", "created_at",
"data": <job or checkpoint object>}``, signed per Standard Webhooks (https://www.standardwebhooks.com)
when sent (``app.services.webhook_delivery``). ``emit`` only adds rows to the caller's transaction:
nothing on a request's path ever waits for a receiver.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from app.errors import InvalidRequest, NotFound
from app.models import Checkpoint, DeliveryStatus, EndpointStatus, Job, WebhookDelivery, WebhookEndpoint
from app.models.base import new_id, utcnow
from app.services import webhook_targets
from app.services.views import checkpoint_view, job_view
from app.services.webhook_targets import TargetPolicy, TargetRefused

JOB_SUCCEEDED = "fine_tuning.job.succeeded"
JOB_FAILED = "fine_tuning.job.failed"
JOB_CANCELLED = "fine_tuning.job.cancelled"
JOB_PAUSED = "fine_tuning.job.paused"
CHECKPOINT_CREATED = "fine_tuning.job.checkpoint.created"
EVENT_TYPES = (JOB_SUCCEEDED, JOB_FAILED, JOB_CANCELLED, JOB_PAUSED, CHECKPOINT_CREATED)

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def sign(secret: str, msg_id: str, timestamp: int, body: str) -> str:
    """The ``webhook-signature`` header value: ``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    digest = hmac.new(key, f"{msg_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


# ---- endpoints ---------------------------------------------------------------------------------------


def create_endpoint(
    session: Session,
    project_id: str,
    *,
    url: str,
    events: list[str] | None,
    description: str | None,
    self_addresses: Iterable[tuple[str, int]],
    policy: TargetPolicy,
) -> WebhookEndpoint:
    unknown = sorted(set(events or ()) - set(EVENT_TYPES))
    if unknown:
        raise InvalidRequest(
            f"Unknown event types {unknown}; known: {list(EVENT_TYPES)}.", param="events", code="invalid_event_type"
        )
    check_url(url, self_addresses=self_addresses, policy=policy)
    endpoint = WebhookEndpoint(
        id=new_id("whep"),
        project_id=project_id,
        url=url,
        events=sorted(set(events)) if events else None,
        description=description,
        secret=new_secret(),
        status=EndpointStatus.ACTIVE,
        consecutive_failures=0,
        created_at=utcnow(),
    )
    session.add(endpoint)
    session.flush()
    return endpoint


def get_endpoint(session: Session, project_id: str, endpoint_id: str) -> WebhookEndpoint:
    row = session.scalar(
        select(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_id, WebhookEndpoint.project_id == project_id)
    )
    if row is None:
        raise NotFound(f"No such webhook endpoint: {endpoint_id}", param="webhook_id")
    return row


def list_endpoints(session: Session, project_id: str) -> list[WebhookEndpoint]:
    stmt = select(WebhookEndpoint).where(WebhookEndpoint.project_id == project_id)
    return list(session.scalars(stmt.order_by(WebhookEndpoint.created_at.desc(), WebhookEndpoint.id.desc())))


def delete_endpoint(session: Session, project_id: str, endpoint_id: str) -> None:
    """Removes the endpoint and its delivery log; an attempt already in flight is not recorded."""
    session.delete(get_endpoint(session, project_id, endpoint_id))


def list_deliveries(
    session: Session, project_id: str, endpoint_id: str, *, after: str | None, limit: int
) -> tuple[list[WebhookDelivery], bool]:
    """Newest first, keyset-paginated on (created_at, id)."""
    endpoint = get_endpoint(session, project_id, endpoint_id)
    stmt = select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint.id)
    if after:
        cursor = session.scalar(
            select(WebhookDelivery).where(WebhookDelivery.id == after, WebhookDelivery.endpoint_id == endpoint.id)
        )
        if cursor is None:
            raise InvalidRequest(f"after: no such delivery {after}", param="after")
        stmt = stmt.where(
            or_(
                WebhookDelivery.created_at < cursor.created_at,
                and_(WebhookDelivery.created_at == cursor.created_at, WebhookDelivery.id < cursor.id),
            )
        )
    order = (WebhookDelivery.created_at.desc(), WebhookDelivery.id.desc())
    rows = list(session.scalars(stmt.order_by(*order).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


# ---- URL checks --------------------------------------------------------------------------------------


def check_url(url: str, *, self_addresses: Iterable[tuple[str, int]], policy: TargetPolicy) -> None:
    """An absolute http(s) URL the sender can send to; never this service itself; only addresses that
    ``policy`` allows (``app.services.webhook_targets``). Raises ``InvalidRequest`` (param ``url``).

    The name is resolved here for a clear 400, and again at every delivery, where the connection is
    pinned to the address that was checked (DNS rebinding cannot slip a private address in between).
    """
    parsed = parse_url(url)
    host, port = parsed.host, parsed.port or (443 if parsed.scheme == "https" else 80)
    self_addresses = [(h.lower().strip("[]"), p) for h, p in self_addresses]
    if any(port == p and host == h for h, p in self_addresses):
        raise InvalidRequest("url points at this service itself.", param="url", code="invalid_url")
    targets = webhook_targets.resolve(host, port)
    if not targets:
        raise InvalidRequest(f"url: cannot resolve host {host!r}.", param="url", code="invalid_url")
    reached = {webhook_targets.effective_address(t) for t in targets}
    local = any(webhook_targets.kind_of(t) in ("loopback", "unspecified") for t in targets)
    for self_host, self_port in self_addresses:
        # Our own port on this machine (loopback, in any spelling) is us too, whatever name the request
        # came in on.
        if port != self_port:
            continue
        ours = {webhook_targets.effective_address(a) for a in webhook_targets.resolve(self_host, self_port)}
        if local or reached & ours:
            raise InvalidRequest("url points at this service itself.", param="url", code="invalid_url")
    try:
        policy.checked_addresses(host, port)
    except TargetRefused as exc:
        raise InvalidRequest(f"url is refused: {exc}.", param="url", code="invalid_url") from exc


def parse_url(url: str) -> httpx.URL:
    """Parse ``url`` with the parser that will send to it (httpx), after refusing what it would only fail
    on later: control characters (a CR/LF would split the request line), spaces, non-ASCII characters,
    credentials, schemes other than http(s)."""
    bad = next((c for c in url if not ("!" <= c <= "~")), None)
    if bad is not None:
        raise InvalidRequest(
            f"url contains the character {bad!r} at position {url.index(bad)}; only printable ASCII is "
            "accepted (percent-encode anything else, and use the punycode form of an international host).",
            param="url",
            code="invalid_url",
        )
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port out of range
        parsed = httpx.URL(url)
    except (ValueError, httpx.InvalidURL) as exc:
        raise InvalidRequest(f"url is not a valid URL: {exc}", param="url", code="invalid_url") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname or not parsed.host:
        raise InvalidRequest("url must be an absolute http:// or https:// URL.", param="url", code="invalid_url")
    if parts.username or parts.password:
        raise InvalidRequest("url must not carry credentials.", param="url", code="invalid_url")
    return parsed


# ---- emit --------------------------------------------------------------------------------------------


def emit(session: Session, project_id: str, event_type: str, data: dict[str, Any]) -> int:
    """Write one pending delivery per subscribed endpoint, in the caller's transaction. Returns how many."""
    assert event_type in EVENT_TYPES, event_type
    endpoints = [
        e
        for e in session.scalars(select(WebhookEndpoint).where(WebhookEndpoint.project_id == project_id))
        if e.events is None or event_type in e.events
    ]
    if not endpoints:
        return 0
    now = utcnow()
    event_id = "evt_" + secrets.token_hex(12)
    payload = {"id": event_id, "type": event_type, "created_at": int(now.timestamp()), "data": data}
    for endpoint in endpoints:
        session.add(
            WebhookDelivery(
                id=new_id("whdel"),
                endpoint_id=endpoint.id,
                project_id=project_id,
                event_id=event_id,
                event_type=event_type,
                payload=payload,
                status=DeliveryStatus.PENDING,
                attempts=0,
                next_attempt_at=now,
                created_at=now,
            )
        )
    return len(endpoints)


def emit_job(session: Session, job: Job, event_type: str) -> int:
    return emit(session, job.project_id, event_type, job_view(job).model_dump(mode="json"))


def emit_checkpoint(session: Session, checkpoint: Checkpoint, job: Job) -> int:
    return emit(session, job.project_id, CHECKPOINT_CREATED, checkpoint_view(checkpoint, job).model_dump(mode="json"))
