"""Per-API-key request rate limit: a token bucket, in Redis when the API has one, else in process.

Each key gets a bucket of ``per_minute`` tokens that refills continuously at ``per_minute / 60`` tokens a
second; a request takes one token, and an empty bucket is a 429 whose ``Retry-After`` says when the next
token arrives.

``RedisRateLimiter`` (``IPO_REDIS_URL``, or the broker when it is Redis) keeps the buckets in Redis and
updates them in one Lua script, so the read-refill-take is atomic and every API process and replica draws
from the same bucket: the limit holds for the service as a whole. The script uses the Redis server's
clock, so replicas with skewed clocks still agree. If Redis cannot be reached the request is checked
against an in-process bucket instead (and a warning logged): an outage degrades the limit to per-process,
it does not refuse every request. ``RequestRateLimiter`` (the embedded default, no Redis) keeps them in
this process only: with N uvicorn workers a key can make up to N times the limit.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from app.errors import RateLimited

log = logging.getLogger(__name__)

MAX_TRACKED_KEYS = 100_000
"""Buckets of keys idle long enough to be full again are dropped once this many are tracked."""


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter(Protocol):
    per_minute: int
    blocking: bool
    """True when ``check`` may block on I/O (a Redis round trip): callers run it off the event loop."""

    def check(self, key_id: str) -> None: ...


def _refusal(per_minute: int, wait: int) -> RateLimited:
    return RateLimited(
        f"Rate limit reached: {per_minute} requests per minute for this API key. Retry in {wait} s.",
        retry_after=wait,
    )


class RequestRateLimiter:
    """In-process token buckets (per API process); ``clock`` in seconds (tests pass a fake one)."""

    blocking = False

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
        raise _refusal(self.per_minute, wait)

    def _forget_full(self, now: float) -> None:
        refill = self.per_minute / self.rate
        for key in [k for k, b in self._buckets.items() if now - b.updated >= refill]:
            del self._buckets[key]


_TAKE = """
local per_minute = tonumber(ARGV[1])
local rate = per_minute / 60.0
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local b = redis.call('HMGET', KEYS[1], 'tokens', 'updated')
local tokens = tonumber(b[1]) or per_minute
local updated = tonumber(b[2]) or now
tokens = math.min(per_minute, tokens + math.max(0, now - updated) * rate)
local taken = 0
if tokens >= 1 then
  tokens = tokens - 1
  taken = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'updated', tostring(now))
redis.call('EXPIRE', KEYS[1], 61)
return {taken, tostring(tokens)}
"""
"""Refill then take one token, atomically (a Lua script runs alone). A bucket idle 60 s is full again, so
its hash expires after 61 s (a missing bucket reads as full). Returns ``[1|0, tokens left]``."""


class RedisRateLimiter:
    """Token buckets shared by every API process through Redis (hash ``{prefix}:{key_id}``).

    ``client`` is a ``redis.Redis``; ``fallback`` checks a request when Redis raises (connection refused,
    timeout), so an outage leaves a per-process limit rather than an outage of the API.
    """

    blocking = True

    def __init__(self, per_minute: int, client: Any, prefix: str = "ipo:ratelimit") -> None:
        self.per_minute = per_minute
        self.rate = per_minute / 60.0
        self.client = client
        self.prefix = prefix
        self.fallback = RequestRateLimiter(per_minute)
        self._take = client.register_script(_TAKE)

    @property
    def enabled(self) -> bool:
        return self.per_minute > 0

    def check(self, key_id: str) -> None:
        """Take one token for ``key_id`` from the shared bucket or raise ``RateLimited``."""
        if not self.enabled:
            return
        try:
            taken, tokens = self._take(keys=[f"{self.prefix}:{key_id}"], args=[self.per_minute])
        except Exception as exc:  # redis.RedisError or OSError: degrade to the per-process bucket
            log.warning("rate limit store unreachable, limiting per process: %s: %s", type(exc).__name__, exc)
            self.fallback.check(key_id)
            return
        if int(taken):
            return
        raise _refusal(self.per_minute, max(1, math.ceil((1.0 - float(tokens)) / self.rate)))


def make_rate_limiter(per_minute: int, redis_url: str | None) -> RateLimiter:
    """The Redis-backed limiter when ``redis_url`` is set (``redis://`` or ``rediss://``), else the
    in-process one."""
    if not redis_url:
        return RequestRateLimiter(per_minute)
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
    return RedisRateLimiter(per_minute, client)
