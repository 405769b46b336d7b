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
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from contracts.chat import ChatCompletionRequest
from inference.engine import Engine, EngineError
from inference.model_thread import Server
from inference.settings import InferenceSettings
from inference.streaming import outcome_of, stream_chunks, usage

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
                stream_chunks(server, prepared, body, cancel, completion_id, now),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        watcher = asyncio.create_task(_watch_disconnect(request, cancel))
        future = asyncio.get_running_loop().run_in_executor(
            server.executor, lambda: server.run_choices(prepared, body, cancel, None, None)
        )
        future.add_done_callback(lambda f: server.release(outcome_of(f, cancel)))
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
                "usage": usage(len(prepared.input_ids), gens),
                "system_fingerprint": None,
            }
        )

    return app


async def _watch_disconnect(request: Request, cancel: threading.Event) -> None:
    """Set ``cancel`` when the client goes away while its (non-streamed) reply is being generated."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            cancel.set()
            return


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
