"""The inference server's HTTP surface: OpenAI's ``/v1/chat/completions`` and ``/v1/models``, vLLM's runtime
``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``, and ``/health``.

No authentication: it listens on loopback (or a private network) and only the API talks to it, as with a
vLLM server behind the API. Admission: ``IPO_INFERENCE_MAX_CONCURRENT`` requests at once (one generating,
the others queued on the model's single thread); more are answered 429 with ``Retry-After``. A request's
slot is freed when its generation ends: finished, past ``IPO_INFERENCE_TIMEOUT_SECONDS``, or cancelled
because the client went away (a streaming client that stops reading, or any client that disconnects).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from contracts.chat import ChatCompletionRequest
from inference.engine import Engine, EngineError, Generation, Prepared
from inference.settings import InferenceSettings

log = logging.getLogger(__name__)
T = TypeVar("T")


class LoadLoraAdapter(BaseModel):
    """vLLM's ``POST /v1/load_lora_adapter`` body."""

    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1, max_length=300)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadLoraAdapter(BaseModel):
    """vLLM's ``POST /v1/unload_lora_adapter`` body."""

    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1, max_length=300)


def error_response(
    status: int,
    message: str,
    *,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> JSONResponse:
    """OpenAI's error shape (vLLM answers the same)."""
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status, headers=headers)


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


def _usage(prompt_tokens: int, gens: list[Generation]) -> dict[str, int]:
    completion = sum(g.completion_tokens for g in gens)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def create_app(settings: InferenceSettings | None = None, engine: Engine | None = None) -> FastAPI:
    """The ASGI app (``uvicorn inference.server:create_app --factory``). Loads the base model now."""
    settings = settings or InferenceSettings()
    if engine is None:
        name = settings.resolved_model()
        engine = Engine(
            settings.resolved_models_dir / name,
            name,
            device=settings.device,
            max_adapters=settings.inference_max_adapters,
        )
    server = Server(settings, engine)
    created = int(time.time())

    app = FastAPI(title="ipo-align inference", version="0.1.0")
    app.state.server = server

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ())[1:] if not str(p).startswith(("function-", "constrained-"))]
        param = ".".join(loc) or None
        message = str(first.get("msg", "invalid request"))
        return error_response(400, f"{param}: {message}" if param else message, param=param, code="invalid_value")

    @app.exception_handler(EngineError)
    async def _engine(_: Request, exc: EngineError) -> JSONResponse:
        type_ = "NotFoundError" if exc.status == 404 else "invalid_request_error"
        return error_response(exc.status, exc.message, type_=type_, param=exc.param, code=exc.code)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        s = server.stats
        return {
            "status": "ok",
            "model": engine.name,
            "device": engine.device,
            "active": s.active,
            "max_concurrent": settings.inference_max_concurrent,
            "completed": s.completed,
            "cancelled": s.cancelled,
            "refused_busy": s.refused_busy,
            "adapters": [name for name, _ in server.adapters],
            "max_adapters": engine.max_adapters,
            "evictions": engine.evictions,
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        base = {
            "id": engine.name,
            "object": "model",
            "created": created,
            "owned_by": "ipo-align",
            "root": str(engine.model_dir),
            "parent": None,
            "max_model_len": engine.context,
        }
        loras = [
            {"id": n, "object": "model", "created": created, "owned_by": "ipo-align", "root": p, "parent": engine.name}
            for n, p in server.adapters
        ]
        return {"object": "list", "data": [base, *loras]}

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoraAdapter) -> Response:
        root = settings.resolved_adapters_dir
        path = Path(body.lora_path).resolve()
        if root != path and root not in path.parents:
            return error_response(400, f"lora_path must be under {root}.", param="lora_path")

        def load() -> None:
            engine.load_adapter(body.lora_name, path)
            server.snapshot_adapters()

        await server.on_model_thread(load)
        log.info("adapter loaded", extra={"lora_name": body.lora_name, "lora_path": str(path)})
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoraAdapter) -> Response:
        def unload() -> None:
            engine.unload_adapter(body.lora_name)
            server.snapshot_adapters()

        await server.on_model_thread(unload)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        if not server.try_admit():
            return error_response(
                429,
                f"The inference server is busy ({settings.inference_max_concurrent} requests at once); retry shortly.",
                type_="rate_limit_error",
                code="server_busy",
            )
        try:
            prepared = await asyncio.to_thread(engine.prepare, body, settings.inference_max_tokens)
        except BaseException:
            server.release("refused")
            raise
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        cancel = threading.Event()
        if body.stream:
            return StreamingResponse(
                _stream(server, prepared, body, cancel, completion_id, now),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        watcher = asyncio.create_task(_watch_disconnect(request, cancel))
        future = asyncio.get_running_loop().run_in_executor(
            server.executor, lambda: server.run_choices(prepared, body, cancel, None, None)
        )
        future.add_done_callback(lambda f: server.release(_reason(f, cancel)))
        try:
            gens = await asyncio.shield(future)
        except asyncio.CancelledError:
            cancel.set()
            raise
        finally:
            watcher.cancel()
        return JSONResponse(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": now,
                "model": body.model,
                "choices": [
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": g.text},
                        "finish_reason": g.finish_reason,
                        "logprobs": None,
                    }
                    for i, g in enumerate(gens)
                ],
                "usage": _usage(len(prepared.input_ids), gens),
                "system_fingerprint": None,
            }
        )

    return app


def _reason(future: Any, cancel: threading.Event) -> str:
    return "cancelled" if cancel.is_set() or future.cancelled() or future.exception() is not None else "completed"


async def _watch_disconnect(request: Request, cancel: threading.Event) -> None:
    """Set ``cancel`` when the client goes away while its (non-streamed) reply is being generated."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            cancel.set()
            return


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


async def _stream(
    server: Server,
    prepared: Prepared,
    body: ChatCompletionRequest,
    cancel: threading.Event,
    completion_id: str,
    created: int,
) -> AsyncIterator[bytes]:
    """OpenAI's chunk stream: per choice a ``role`` delta, content deltas and a last delta with its
    ``finish_reason``; then, with ``stream_options.include_usage``, a chunk with ``usage`` and no choices;
    then ``data: [DONE]``. Closing the stream early (the client left) cancels the generation."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, int, Any]] = asyncio.Queue()

    def put(item: tuple[str, int, Any]) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, item)

    future = loop.run_in_executor(
        server.executor,
        lambda: server.run_choices(
            prepared,
            body,
            cancel,
            lambda i, t: put(("text", i, t)),
            lambda i, g: put(("done", i, g)),
            lambda i: put(("start", i, None)),
        ),
    )

    def finished(f: Any) -> None:
        server.release(_reason(f, cancel))
        put(("end", -1, f))

    future.add_done_callback(finished)

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return _sse(
            {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": body.model,
                "system_fingerprint": None,
                "choices": choices,
                **extra,
            }
        )

    started: set[int] = set()

    def role(i: int) -> bytes | None:
        if i in started:
            return None
        started.add(i)
        return chunk(
            [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
        )

    gens: list[Generation] = []
    try:
        while True:
            kind, i, value = await queue.get()
            if kind == "start":  # the role chunk goes out as soon as the choice's generation begins
                if (first := role(i)) is not None:
                    yield first
            elif kind == "text":
                if (first := role(i)) is not None:
                    yield first
                yield chunk([{"index": i, "delta": {"content": value}, "logprobs": None, "finish_reason": None}])
            elif kind == "done":
                gens.append(value)
                if (first := role(i)) is not None:
                    yield first
                yield chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": value.finish_reason}])
            else:
                if (exc := value.exception()) is not None:
                    if isinstance(exc, EngineError):
                        error = {"message": exc.message, "type": "invalid_request_error", "param": exc.param,
                                 "code": exc.code}  # fmt: skip
                    else:
                        log.error("generation failed", exc_info=exc)
                        error = {"message": "generation failed", "type": "server_error", "param": None, "code": None}
                    yield _sse({"error": error})
                    return
                break
        if body.stream_options is not None and body.stream_options.include_usage:
            yield chunk([], usage=_usage(len(prepared.input_ids), gens))
        yield b"data: [DONE]\n\n"
    finally:
        cancel.set()  # a no-op once generation is over; otherwise the client left: stop generating


def run(host: str = "127.0.0.1", port: int = 8001) -> None:
    """``ipo inference``: serve with uvicorn (one process: the model is loaded once)."""
    import uvicorn

    from contracts.logs import configure_logging, logging_config

    settings = InferenceSettings()
    configure_logging(settings.log_level, settings.log_format)
    uvicorn.run(
        "inference.server:create_app",
        factory=True,
        host=host,
        port=port,
        workers=1,
        log_config=logging_config(settings.log_level, settings.log_format),
        timeout_graceful_shutdown=5,
    )


__all__ = ["create_app", "run"]
