"""The webhook sender: takes due delivery rows, POSTs them signed (Standard Webhooks), records the outcome.

A delivery is claimed in a short transaction that pushes its ``next_attempt_at`` past the attempt's
timeout, then sent with no transaction open, then its outcome is written in another short transaction.
So several API replicas can run this loop at once (claims use ``FOR UPDATE SKIP LOCKED``), a crashed
sender's claim simply expires and the delivery is retried, and a slow receiver holds one of
``IPO_WEBHOOK_CONCURRENCY`` sender threads, never a job, a request or the other endpoints.
Receivers must de-duplicate on ``webhook-id``: delivery is at least once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.errors import InvalidRequest
from app.models import DeliveryStatus, EndpointStatus, WebhookDelivery, WebhookEndpoint
from app.models.base import utcnow
from app.services import metrics
from app.services.leader import Leadership
from app.services.webhook_targets import TargetPolicy, TargetRefused
from app.services.webhooks import parse_url, sign
from app.settings import Settings

log = logging.getLogger(__name__)

BACKOFF = (1, 6, 24, 120, 720)
"""Waits before each retry, in units of ``IPO_WEBHOOK_RETRY_BASE_SECONDS`` (5 s, 30 s, 2 min, 10 min, 1 h)."""
CLAIM_MARGIN_SECONDS = 30
USER_AGENT = "ipo-align-webhooks/1"


@dataclass(frozen=True)
class Claimed:
    delivery_id: str
    event_id: str
    url: str
    secret: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class Outcome:
    ok: bool
    status: int | None
    error: str | None


def claim_due(session: Session, settings: Settings, limit: int) -> list[Claimed]:
    now = utcnow()
    rows = list(
        session.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.status == DeliveryStatus.PENDING, WebhookDelivery.next_attempt_at <= now)
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    )
    claimed = []
    for row in rows:
        endpoint = session.get(WebhookEndpoint, row.endpoint_id)
        if endpoint is None:
            continue
        row.next_attempt_at = now + timedelta(seconds=settings.webhook_timeout_seconds + CLAIM_MARGIN_SECONDS)
        claimed.append(Claimed(row.id, row.event_id, endpoint.url, endpoint.secret, row.payload))
    return claimed


def new_client(settings: Settings) -> httpx.Client:
    """The sender's HTTP client: no redirects (a 3xx is a failed attempt, never followed to another
    host), no proxy from the environment (a proxy would resolve the name itself, past the address
    check), and no kept-alive connections (each delivery connects to the address it just checked, with
    its own TLS server name; a pooled connection is keyed by address only)."""
    return httpx.Client(
        timeout=settings.webhook_timeout_seconds,
        follow_redirects=False,
        trust_env=False,
        limits=httpx.Limits(max_keepalive_connections=0),
    )


def send(client: httpx.Client, item: Claimed, policy: TargetPolicy) -> Outcome:
    """One delivery attempt. Never raises: whatever fails (a refused or unresolvable address, a URL the
    client rejects, a timeout, a non-2xx answer) is a failed ``Outcome`` that ``record`` counts.

    The target's name is resolved and checked here (``policy``), then the request is sent to that
    checked address (the URL's host goes in ``Host`` and as the TLS server name), so the connection
    reaches exactly what was checked. ``Outcome.error`` names the status code or the error class only:
    a receiver's answer, or a network error's text, is never shown to the caller (it may come from a
    service the caller should not be able to read).
    """
    try:
        return _attempt(client, item, policy)
    except Exception as exc:  # a bug or a corrupt row: still an attempt, counted, never a stuck delivery
        log.warning("webhook delivery %s failed: %s", item.delivery_id, type(exc).__name__, exc_info=True)
        return Outcome(False, None, type(exc).__name__)


def _attempt(client: httpx.Client, item: Claimed, policy: TargetPolicy) -> Outcome:
    body = json.dumps(item.payload, separators=(",", ":"), ensure_ascii=False)
    timestamp = int(time.time())
    headers = {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": item.event_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(item.secret, item.event_id, timestamp, body),
    }
    try:
        url = parse_url(item.url)
        port = url.port or (443 if url.scheme == "https" else 80)
        addresses = policy.checked_addresses(url.host, port)
    except InvalidRequest:
        return Outcome(False, None, "InvalidURL: the endpoint's url is not a valid http(s) URL")
    except TargetRefused as exc:
        return Outcome(False, None, f"TargetRefused: {exc}"[:1000])
    headers["host"] = url.netloc.decode("ascii")
    extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
    response: httpx.Response | None = None
    error = "NoAddress"
    for address in addresses:  # in resolver order; the next one only when this one cannot be reached
        pinned = url.copy_with(host=str(address))
        try:
            response = client.post(pinned, content=body.encode(), headers=headers, extensions=extensions)
            break
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            error = type(exc).__name__
        except httpx.HTTPError as exc:
            return Outcome(False, None, type(exc).__name__)
    if response is None:
        return Outcome(False, None, error)
    if 200 <= response.status_code < 300:
        return Outcome(True, response.status_code, None)
    return Outcome(False, response.status_code, f"HTTP {response.status_code}")


def record(session: Session, settings: Settings, delivery_id: str, outcome: Outcome) -> str | None:
    """Write one attempt's outcome; returns the metric outcome (None when the endpoint was deleted meanwhile)."""
    row = session.scalar(select(WebhookDelivery).where(WebhookDelivery.id == delivery_id).with_for_update())
    endpoint = session.get(WebhookEndpoint, row.endpoint_id) if row is not None else None
    if row is None or endpoint is None:
        return None
    now = utcnow()
    row.attempts += 1
    row.last_attempt_at = now
    row.response_status = outcome.status
    if outcome.ok:
        row.status, row.delivered_at, row.next_attempt_at, row.last_error = DeliveryStatus.SUCCEEDED, now, None, None
        endpoint.consecutive_failures = 0
        endpoint.status = EndpointStatus.ACTIVE
        return "succeeded"
    row.last_error = outcome.error
    endpoint.consecutive_failures += 1
    if endpoint.consecutive_failures >= settings.webhook_failing_after:
        endpoint.status = EndpointStatus.FAILING
    if row.attempts >= settings.webhook_max_attempts:
        row.status, row.next_attempt_at = DeliveryStatus.FAILED, None
        return "failed"
    wait = settings.webhook_retry_base_seconds * BACKOFF[min(row.attempts, len(BACKOFF)) - 1]
    row.next_attempt_at = now + timedelta(seconds=wait)
    return "retrying"


class WebhookSenderThread(threading.Thread):
    def __init__(self, sessions: sessionmaker[Session], settings: Settings, leader: Leadership | None = None) -> None:
        super().__init__(name="ipo-webhooks", daemon=True)
        self.sessions, self.settings = sessions, settings
        self.leader = leader
        self.stopping = threading.Event()
        self.pool = ThreadPoolExecutor(settings.webhook_concurrency, thread_name_prefix="ipo-webhook-send")
        self.in_flight: set[str] = set()
        self.lock = threading.Lock()
        self.client = new_client(settings)
        self.policy = TargetPolicy.from_settings(settings)

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.tick()
            except Exception as exc:  # database down: log, keep looping, recover by itself
                log.warning("webhook sender tick failed: %s: %s", type(exc).__name__, exc)
            self.stopping.wait(self.settings.webhook_poll_seconds)

    def tick(self) -> int:
        if self.leader is not None and not self.leader.held():  # one sender across API processes
            return 0
        with self.lock:
            free = self.settings.webhook_concurrency - len(self.in_flight)
        if free <= 0:
            return 0
        with self.sessions() as session, session.begin():
            claimed = claim_due(session, self.settings, free)
        for item in claimed:
            with self.lock:
                self.in_flight.add(item.delivery_id)
            self.pool.submit(self._deliver, item)
        return len(claimed)

    def _deliver(self, item: Claimed) -> None:
        try:
            outcome = send(self.client, item, self.policy)
            with self.sessions() as session, session.begin():
                counted = record(session, self.settings, item.delivery_id, outcome)
            if counted:
                metrics.webhook_attempt(counted)
        except Exception as exc:  # the claim expires and the delivery is retried
            log.warning("webhook delivery %s failed: %s: %s", item.delivery_id, type(exc).__name__, exc)
        finally:
            with self.lock:
                self.in_flight.discard(item.delivery_id)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=10)
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.client.close()
