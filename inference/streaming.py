"""OpenAI's chat-completion chunk stream (``stream: true``): the choices generated on the model thread, their
text handed to the event loop as it comes, each choice's ``role`` / content / ``finish_reason`` deltas, the
optional ``usage`` chunk and ``data: [DONE]``; a client that leaves cancels the generation."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

from contracts.chat import ChatCompletionRequest
from inference.engine import EngineError, Generation, Prepared
from inference.model_thread import Server

log = logging.getLogger(__name__)


def usage(prompt_tokens: int, gens: list[Generation]) -> dict[str, int]:
    """OpenAI's ``usage`` object: the prompt's tokens once, the completion tokens of every choice."""
    completion = sum(g.completion_tokens for g in gens)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def outcome_of(future: Any, cancel: threading.Event) -> str:
    """How a generation ended, for ``Server.release``'s counts: ``cancelled`` (client left, timeout, error)
    or ``completed``."""
    return "cancelled" if cancel.is_set() or future.cancelled() or future.exception() is not None else "completed"


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


async def stream_chunks(
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
        server.release(outcome_of(f, cancel))
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
            yield chunk([], usage=usage(len(prepared.input_ids), gens))
        yield b"data: [DONE]\n\n"
    finally:
        cancel.set()  # a no-op once generation is over; otherwise the client left: stop generating
