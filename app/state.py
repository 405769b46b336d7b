"""Process-wide resources of one API instance, built once by ``create_app`` and kept on ``app.state``."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.services.rate_limit import RequestRateLimiter
from app.settings import Settings
from app.storage import Storage


@dataclass
class AppContext:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    storage: Storage
    worker_token: str
    rate_limiter: RequestRateLimiter
    wake_dispatcher: threading.Event = field(default_factory=threading.Event)
    """Set after a commit that wrote outbox rows, so they are sent at once rather than on the next tick."""
