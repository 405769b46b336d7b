"""The singleton loops (outbox dispatcher + lease reaper, webhook sender), started and stopped together.

They run inside every API process by default (``IPO_RUN_DISPATCHER``, ``IPO_RUN_WEBHOOK_SENDER``), where
one leader among all processes on the database acts (``app.services.leader``). ``ipo dispatcher`` runs
them in a process of their own instead, so a burst of requests on the leading replica cannot slow the
doorbells, nor the doorbells the requests: set both settings to ``false`` on the API replicas and run one
or more ``ipo dispatcher`` (one of them leads; the others stand by).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

from sqlalchemy import create_engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from app.models.outbox import OUTBOX_CHANNEL
from app.services.dispatch import CeleryDoorbell, DispatcherThread, Doorbell
from app.services.leader import Leadership
from app.services.webhook_delivery import WebhookSenderThread
from app.settings import Settings

log = logging.getLogger(__name__)

LISTEN_RETRY_SECONDS = 2.0
"""How long the listener waits before reconnecting after its connection failed (the interval covers it)."""


class OutboxListener(threading.Thread):
    """Sets ``wake`` whenever a commit in any process wrote an outbox row (Postgres ``LISTEN ipo_outbox``;
    ``app.models.outbox.notify_new_outbox_rows`` sends the NOTIFY), so the leading dispatcher sends the doorbell
    at once wherever the job was created. On a dedicated connection; if it drops, it reconnects, and
    ``IPO_DISPATCH_INTERVAL_SECONDS`` covers the gap."""

    def __init__(self, database_url: str, wake: threading.Event) -> None:
        super().__init__(name="ipo-outbox-listener", daemon=True)
        self.engine = create_engine(database_url, poolclass=NullPool, connect_args={"connect_timeout": 5})
        self.wake = wake
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self._listen()
            except Exception as exc:  # database down or connection cut: retry, the interval covers it
                log.warning("outbox listener: %s: %s", type(exc).__name__, exc)
                self.stopping.wait(LISTEN_RETRY_SECONDS)

    def _listen(self) -> None:
        raw: Any = self.engine.raw_connection()
        try:
            conn = raw.driver_connection  # psycopg.Connection
            conn.autocommit = True
            conn.execute(f"LISTEN {OUTBOX_CHANNEL}")
            self.wake.set()  # rows committed before LISTEN took effect: look now
            while not self.stopping.is_set():
                for _ in conn.notifies(timeout=1.0, stop_after=1):
                    self.wake.set()
        finally:
            with contextlib.suppress(Exception):
                raw.close()

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=5)
        self.engine.dispose()


class LeaderLoops:
    """The dispatcher and/or webhook sender threads of one process, sharing one :class:`Leadership`.

    ``wake``: set after a commit that wrote an outbox row, to dispatch at once: by the request in this
    process, and on Postgres by an :class:`OutboxListener` for commits in any process (other replicas,
    when the loops run in ``ipo dispatcher``). Otherwise rows are picked up within
    ``IPO_DISPATCH_INTERVAL_SECONDS``. ``doorbell`` defaults to Celery on ``IPO_BROKER_URL``.
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
        self.listener = (
            OutboxListener(settings.resolved_database_url, wake)
            if dispatcher and settings.resolved_database_url.startswith("postgresql")
            else None
        )

    def start(self) -> None:
        for thread in (self.listener, self.dispatcher, self.sender):
            if thread is not None:
                thread.start()

    def stop(self) -> None:
        """Stop the threads (each finishes its current pass, 10 s at most) and give up the leader lock at
        once, so a standby takes over without waiting for a timeout."""
        for thread in (self.sender, self.dispatcher, self.listener):
            if thread is not None:
                thread.stop()
        self.leader.release()
