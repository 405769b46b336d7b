"""Process-wide resources of one API instance, built once by ``create_app`` and kept on ``app.state``."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.auth import KeyCache
from app.services.event_feed import EventHub, Poll
from app.services.rate_limit import RateLimiter
from app.settings import Settings
from app.storage import Storage


@dataclass
class AppContext:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    read_sessions: sessionmaker[Session]
    """Sessions on autocommit connections of the same pool, for work that only reads (``ReadSession``):
    no BEGIN and COMMIT round trips around the queries."""
    storage: Storage
    worker_token: str
    rate_limiter: RateLimiter
    key_cache: KeyCache
    """API keys looked up in the last ``IPO_API_KEY_CACHE_SECONDS`` (``AuthGateMiddleware``)."""
    event_hub: EventHub
    """Shared live feeds of job events behind every SSE stream of this process."""
    event_poll: Poll
    """Reads a job's events after an id (and whether it ended): the hub's poll, and stream replays."""
    wake_dispatcher: threading.Event = field(default_factory=threading.Event)
    """Set after a commit that wrote outbox rows, so they are sent at once rather than on the next tick."""
