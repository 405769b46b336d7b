"""The inference server's model thread: one engine, one thread that runs every generation and adapter change
on it (the model is not thread-safe), and the admission counter ``IPO_INFERENCE_MAX_CONCURRENT`` with the
counts ``/health`` reports."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from contracts.chat import ChatCompletionRequest
from inference.engine import Engine, Generation, Prepared
from inference.settings import InferenceSettings

T = TypeVar("T")


@dataclass
class Stats:
    """What ``/health`` reports: requests admitted now and counts since start."""

    active: int = 0
    completed: int = 0
    cancelled: int = 0
    refused_busy: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class Server:
    """The engine, its single model thread and the admission counter."""

    def __init__(self, settings: InferenceSettings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ipo-inference")
        self.stats = Stats()
        self.adapters: list[tuple[str, str]] = []
        """Snapshot of the loaded adapters (name, path), replaced on the model thread after each change."""

    async def on_model_thread(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    def try_admit(self) -> bool:
        with self.stats.lock:
            if self.stats.active >= self.settings.inference_max_concurrent:
                self.stats.refused_busy += 1
                return False
            self.stats.active += 1
            return True

    def release(self, reason: str) -> None:
        with self.stats.lock:
            self.stats.active -= 1
            if reason == "cancelled":
                self.stats.cancelled += 1
            else:
                self.stats.completed += 1

    def snapshot_adapters(self) -> None:
        self.adapters = [(a.name, a.path) for a in self.engine.adapters.values()]

    def run_choices(
        self,
        prepared: Prepared,
        body: ChatCompletionRequest,
        cancel: threading.Event,
        on_text: Callable[[int, str], None] | None,
        on_done: Callable[[int, Generation], None] | None,
        on_start: Callable[[int], None] | None = None,
    ) -> list[Generation]:
        """Generate the ``n`` choices one after the other (on the model thread)."""
        out = []
        for i in range(body.n):
            if on_start is not None:
                on_start(i)
            emit = (lambda t, i=i: on_text(i, t)) if on_text is not None else None
            gen = self.engine.generate(
                prepared,
                body,
                seed_offset=i,
                max_time=self.settings.inference_timeout_seconds,
                cancel=cancel,
                on_text=emit,
            )
            out.append(gen)
            if on_done is not None:
                on_done(i, gen)
            if gen.finish_reason == "cancelled":
                break
        return out
