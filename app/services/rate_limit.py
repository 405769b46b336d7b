"""Per-API-key request rate limit: an in-process token bucket.

Each key gets a bucket of ``per_minute`` tokens that refills continuously at ``per_minute / 60`` tokens a
second; a request takes one token, and an empty bucket is a 429 whose ``Retry-After`` says when the next
token arrives. The buckets live in this API process only: with N uvicorn workers or replicas a key can
make up to N times the limit. That is the accepted trade-off for a limiter with no shared state; a
stricter global limit belongs in the reverse proxy or a shared store.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from app.errors import RateLimited

MAX_TRACKED_KEYS = 100_000
"""Buckets of keys idle long enough to be full again are dropped once this many are tracked."""


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RequestRateLimiter:
    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.rate = per_minute / 60.0
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.per_minute > 0

    def check(self, key_id: str) -> None:
        """Take one token for ``key_id`` or raise ``RateLimited`` (429 with ``Retry-After``)."""
        if not self.enabled:
            return
        now = self.clock()
        with self._lock:
            bucket = self._buckets.get(key_id)
            if bucket is None:
                if len(self._buckets) >= MAX_TRACKED_KEYS:
                    self._forget_full(now)
                bucket = self._buckets[key_id] = _Bucket(float(self.per_minute), now)
            bucket.tokens = min(float(self.per_minute), bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return
            wait = math.ceil((1.0 - bucket.tokens) / self.rate)
        raise RateLimited(
            f"Rate limit reached: {self.per_minute} requests per minute for this API key. Retry in {wait} s.",
            retry_after=wait,
        )

    def _forget_full(self, now: float) -> None:
        refill = self.per_minute / self.rate
        for key in [k for k, b in self._buckets.items() if now - b.updated >= refill]:
            del self._buckets[key]
