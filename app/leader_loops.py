"""The singleton loops (outbox dispatcher + lease reaper, webhook sender), started and stopped together.

They run inside every API process by default (``IPO_RUN_DISPATCHER``, ``IPO_RUN_WEBHOOK_SENDER``), where
one leader among all processes on the database acts (``app.services.leader``). ``ipo dispatcher`` runs
them in a process of their own instead, so a burst of requests on the leading replica cannot slow the
doorbells, nor the doorbells the requests: set both settings to ``false`` on the API replicas and run one
or more ``ipo dispatcher`` (one of them leads; the others stand by).
"""

from __future__ import annotations

import threading

from sqlalchemy.orm import Session, sessionmaker

from app.services.dispatch import CeleryDoorbell, DispatcherThread, Doorbell
from app.services.leader import Leadership
from app.services.webhook_delivery import WebhookSenderThread
from app.settings import Settings


class LeaderLoops:
    """The dispatcher and/or webhook sender threads of one process, sharing one :class:`Leadership`.

    ``wake``: set after a commit that wrote an outbox row (same process) to dispatch at once; other
    processes' rows are picked up within ``IPO_DISPATCH_INTERVAL_SECONDS``. ``doorbell`` defaults to
    Celery on ``IPO_BROKER_URL``.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        settings: Settings,
        wake: threading.Event,
        *,
        dispatcher: bool,
        webhooks: bool,
        doorbell: Doorbell | None = None,
    ) -> None:
        self.leader = Leadership(settings.resolved_database_url)
        self.dispatcher = (
            DispatcherThread(sessions, settings, doorbell or CeleryDoorbell(settings), wake, self.leader)
            if dispatcher
            else None
        )
        self.sender = WebhookSenderThread(sessions, settings, self.leader) if webhooks else None

    def start(self) -> None:
        for thread in (self.dispatcher, self.sender):
            if thread is not None:
                thread.start()

    def stop(self) -> None:
        """Stop the threads (each finishes its current pass, 10 s at most) and give up the leader lock at
        once, so a standby takes over without waiting for a timeout."""
        for thread in (self.sender, self.dispatcher):
            if thread is not None:
                thread.stop()
        self.leader.release()
