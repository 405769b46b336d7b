"""One attempt's events, numbered (``seq``) and kept in order until the API has them.

An outage delays events but never loses or doubles them: the API drops an ``(attempt, seq)`` it already has,
so re-posting a batch whose response was lost is harmless. Posted through ``worker/api_client.py``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any, Literal

from contracts.internal import EventsRequest, ReportedEvent
from worker.api_client import MAX_EVENTS_PER_POST, MAX_MESSAGE_CHARS, ApiClient, ApiError, ApiUnavailable, LeaseLost

log = logging.getLogger(__name__)


class EventBuffer:
    """Events of one attempt, numbered and kept in order until the API has them.

    ``add`` never blocks on the network; ``flush`` posts the oldest pending events in one batch and
    forgets them only once the API answered. Safe to call from several threads.
    """

    def __init__(self, api: ApiClient, job_id: str, lease_token: str, *, batch_size: int = 500) -> None:
        self._api = api
        self._job_id = job_id
        self._lease_token = lease_token
        self._batch_size = min(batch_size, MAX_EVENTS_PER_POST)
        self._pending: deque[ReportedEvent] = deque()
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._next_seq = 0
        self.delivered = 0
        self.discarded = False

    def add(
        self,
        message: str,
        *,
        type_: Literal["message", "metrics"] = "message",
        level: Literal["info", "warn", "error"] = "info",
        data: dict[str, Any] | None = None,
        created_at: float | None = None,
    ) -> int:
        with self._lock:
            seq = self._next_seq
            self._next_seq += 1
            if self.discarded:
                return seq
            self._pending.append(
                ReportedEvent(
                    seq=seq,
                    type=type_,
                    level=level,
                    message=message[:MAX_MESSAGE_CHARS],
                    data=data,
                    created_at=int(created_at if created_at is not None else time.time()),
                )
            )
            return seq

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def discard(self) -> None:
        """Drop everything (the lease is lost: nothing may be written any more)."""
        with self._lock:
            self.discarded = True
            self._pending.clear()

    def flush(self, *, retry_seconds: float | None = None) -> bool:
        """Post pending events, batch by batch. True when none are left; False when the API is unreachable.

        Raises :class:`LeaseLost`. A batch the API refuses as invalid (4xx) is logged and dropped, so
        one bad event cannot wedge the stream.
        """
        with self._flush_lock:
            while True:
                with self._lock:
                    batch = [self._pending[i] for i in range(min(self._batch_size, len(self._pending)))]
                if not batch:
                    return True
                try:
                    self._api.post_events(
                        self._job_id,
                        EventsRequest(lease_token=self._lease_token, events=batch),
                        retry_seconds=retry_seconds,
                    )
                except ApiUnavailable as exc:
                    log.warning("events not delivered yet (%d pending): %s", self.pending, exc)
                    return False
                except LeaseLost as exc:
                    if exc.code != "invalid_state":
                        raise
                    # Our lease, but the job was cancelled: the API takes no more events from this
                    # attempt. Not a lost lease: the next heartbeat says "cancel" and we stop cleanly.
                    log.info(
                        "job no longer takes events (%s); dropping seq %d..%d", exc.message, batch[0].seq, batch[-1].seq
                    )
                except ApiError as exc:
                    log.error("API refused events seq %d..%d, dropping them: %s", batch[0].seq, batch[-1].seq, exc)
                with self._lock:
                    for _ in batch:
                        if self._pending:
                            self._pending.popleft()
                    self.delivered += len(batch)
