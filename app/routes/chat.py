"""``POST /v1/chat/completions``: OpenAI's chat completions on base models, fine-tuned models and checkpoints.

The API generates nothing itself (it never imports torch): it resolves ``model`` for the caller's project
(``app.services.chat_models``), checks the token cap, and forwards the request to the inference server
(``app.services.inference_gateway``) under the adapter's name there, loading the adapter first when the
server does not have it (a 404 from it: never loaded, or evicted as least recently used). Streamed
answers are relayed chunk by chunk (SSE, ending in ``data: [DONE]``); a client that leaves closes the
upstream stream, which frees the server's slot. Every reply names the model as the caller asked for it.

``Idempotency-Key`` works as on every POST: a retry with the same key and body replays the first reply
(a streamed one as the same chunks), so a retried sampled completion is not a second, different one.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse

from app.deps import Ctx, CurrentCaller, IdempotencyKeyHeader
from app.errors import InvalidRequest
from app.schemas.objects import ErrorResponse
from app.services import chat_models, idempotency
from app.services.chat_models import ChatTarget
from app.services.inference_gateway import InferenceGateway, upstream_error
from app.state import AppContext
from contracts.chat import ChatCompletionRequest

router = APIRouter(
    prefix="/v1/chat",
    tags=["chat"],
    responses={
        400: {"model": ErrorResponse},
        401: {"model": ErrorResponse},
        404: {"model": ErrorResponse},
        409: {"model": ErrorResponse},
        422: {"model": ErrorResponse},
        429: {"model": ErrorResponse},
        503: {"model": ErrorResponse},
    },
)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def gateway(request: Request, ctx: AppContext) -> InferenceGateway:
    """This process's client of ``IPO_INFERENCE_URL``, made on first use."""
    gw: InferenceGateway | None = getattr(request.app.state, "inference", None)
    if gw is None:
        gw = InferenceGateway(ctx.settings.inference_url, ctx.settings.inference_timeout_seconds)
        request.app.state.inference = gw
    return gw


def _resolve(ctx: AppContext, project_id: str, model: str) -> ChatTarget:
    with ctx.sessions() as session:
        return chat_models.resolve(session, project_id, ctx.settings.resolved_models_dir, ctx.storage, model)


def _record(ctx: AppContext, project_id: str, key: str, body: dict[str, Any]) -> None:
    with ctx.sessions() as session:
        idempotency.record(session, project_id, key, 200, body)
        session.commit()


@router.post(
    "/completions",
    response_model=None,
    responses={200: {"content": {"application/json": {}, "text/event-stream": {}}}},
)
async def create_chat_completion(
    request: Request,
    ctx: Ctx,
    caller: CurrentCaller,
    body: ChatCompletionRequest,
    idempotency_key: IdempotencyKeyHeader,
) -> Response:
    """Create a chat completion (``stream=true``: server-sent events, OpenAI's ``chat.completion.chunk``)."""
    return await forward_chat(request, ctx, caller.project_id, body, idempotency_key)


async def forward_chat(
    request: Request, ctx: AppContext, project_id: str, body: ChatCompletionRequest, key: str | None
) -> Response:
    """Resolve ``body.model`` for ``project_id``, forward, and answer (JSON or a relayed SSE stream); the
    dashboard's playground calls this too. Raises the API's domain errors (404, 400, 429, 503...)."""
    limit = body.token_limit
    if limit is not None and limit > ctx.settings.chat_max_tokens:
        raise InvalidRequest(
            f"{body.token_limit_param} is {limit}; the limit is {ctx.settings.chat_max_tokens} (IPO_CHAT_MAX_TOKENS).",
            param=body.token_limit_param,
            code="max_tokens_too_large",
        )
    target = await run_in_threadpool(_resolve, ctx, project_id, body.model)
    sent = body.model_dump(mode="json", exclude_unset=True)
    if key is not None:
        fingerprint = idempotency.request_fingerprint("POST", "/v1/chat/completions", sent)
        replay = await run_in_threadpool(idempotency.reserve, ctx.sessions, project_id, key, fingerprint)
        if replay is not None:
            return _replay(replay.response_body or {}, replay.response_status or 200)
    try:
        upstream = await _open(gateway(request, ctx), ctx, target, {**sent, "model": target.served_name})
    except BaseException:
        if key is not None:
            await run_in_threadpool(idempotency.release, ctx.sessions, project_id, key)
        raise
    if body.stream:
        return StreamingResponse(
            _relay(ctx, project_id, key, target, upstream), media_type="text/event-stream", headers=SSE_HEADERS
        )
    try:
        content = await upstream.aread()
    finally:
        await upstream.aclose()
    data = json.loads(content)
    data["model"] = target.public_id
    if key is not None:
        await run_in_threadpool(_record, ctx, project_id, key, data)
    return JSONResponse(data)


async def _open(gw: InferenceGateway, ctx: AppContext, target: ChatTarget, payload: dict[str, Any]) -> httpx.Response:
    """Open the upstream completion; load the adapter and try once more when the server does not have it."""
    base = await gw.served_base()
    if base != target.base_model:
        raise InvalidRequest(
            f"'{target.public_id}' runs on the base model '{target.base_model}', but the inference server "
            f"serves '{base}'.",
            param="model",
            code="model_not_served",
        )
    response = await gw.open_completion(payload)
    if response.status_code == 404 and target.archive is not None:
        await response.aclose()
        path = await run_in_threadpool(chat_models.unpacked, target, ctx.settings.resolved_adapters_dir, ctx.storage)
        await gw.load_adapter(target.served_name, str(path))
        response = await gw.open_completion(payload)
    if response.status_code != 200:
        content = await response.aread()
        await response.aclose()
        raise upstream_error(response.status_code, content, response.headers, target.public_id)
    return response


async def _relay(
    ctx: AppContext, project_id: str, key: str | None, target: ChatTarget, upstream: httpx.Response
) -> AsyncIterator[bytes]:
    """Pass the server's SSE chunks through, with ``model`` set to the public id; keep them for a replay."""
    chunks: list[Any] = []
    finished = False
    try:
        async for line in upstream.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                finished = True
                yield b"data: [DONE]\n\n"
                break
            obj = json.loads(data)
            if isinstance(obj, dict) and "model" in obj:
                obj["model"] = target.public_id
            chunks.append(obj)
            yield f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()
    finally:
        with anyio.CancelScope(shield=True):  # the client may be gone: close upstream regardless
            await upstream.aclose()
            if key is not None:
                if finished:
                    await run_in_threadpool(
                        _record, ctx, project_id, key, {"object": "chat.completion.stream", "chunks": chunks}
                    )
                else:
                    await run_in_threadpool(idempotency.release, ctx.sessions, project_id, key)


def _replay(body: dict[str, Any], status: int) -> Response:
    headers = idempotency.replay_headers()
    if body.get("object") == "chat.completion.stream":

        async def again() -> AsyncIterator[bytes]:
            for obj in body.get("chunks") or []:
                yield f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(again(), media_type="text/event-stream", headers={**SSE_HEADERS, **headers})
    return JSONResponse(body, status, headers=headers)
