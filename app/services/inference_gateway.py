"""The API's client of the inference server (``IPO_INFERENCE_URL``): the embedded one (``ipo inference``) or
vLLM's OpenAI-compatible server started with ``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``.

Only the protocol both speak is used: ``GET /v1/models`` (the served base model is the entry without a
``parent``), ``POST /v1/load_lora_adapter`` (``lora_name`` + ``lora_path``; "already been loaded" counts
as loaded) and ``POST /v1/chat/completions`` (a 404 for an adapter that is not, or no longer, loaded).
Their errors become the API's own: 400 keeps the server's message and field, 429 keeps ``Retry-After``,
an unreachable or failing server is a 503.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx

from app.errors import DomainError, InvalidRequest, NotFound, RateLimited, ServiceUnavailable

BASE_CACHE_SECONDS = 30.0
"""How long the served base model's name is remembered (a restarted server may serve another)."""


class InferenceGateway:
    """One pooled async HTTP client per API process. ``timeout``: seconds to wait for an answer or for the
    next streamed chunk (``IPO_INFERENCE_TIMEOUT_SECONDS``)."""

    def __init__(self, url: str, timeout: float) -> None:
        self.url = url.rstrip("/")
        self.client = httpx.AsyncClient(
            base_url=self.url, timeout=httpx.Timeout(timeout, connect=5.0, pool=5.0), trust_env=False
        )
        self._base: tuple[float, str | None] | None = None

    async def aclose(self) -> None:
        await self.client.aclose()

    def _unreachable(self, exc: Exception) -> ServiceUnavailable:
        return ServiceUnavailable(
            f"The inference server at {self.url} is unreachable ({type(exc).__name__}); retry shortly.",
            code="inference_unavailable",
        )

    async def served_base(self) -> str | None:
        """The base model the server serves (cached ``BASE_CACHE_SECONDS``)."""
        now = time.monotonic()
        if self._base is not None and now - self._base[0] < BASE_CACHE_SECONDS:
            return self._base[1]
        try:
            r = await self.client.get("/v1/models")
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc
        if r.status_code != 200:
            raise upstream_error(r.status_code, r.content, r.headers)
        data = r.json().get("data") or []
        base = next((m.get("id") for m in data if not m.get("parent")), None)
        self._base = (now, base)
        return base

    async def load_adapter(self, name: str, path: str) -> None:
        try:
            r = await self.client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc
        if r.status_code == 200 or (r.status_code == 400 and b"already been loaded" in r.content):
            return
        raise upstream_error(r.status_code, r.content, r.headers)

    async def open_completion(self, payload: dict[str, Any]) -> httpx.Response:
        """Send the request; the response is open for streaming (the caller closes it)."""
        request = self.client.build_request("POST", "/v1/chat/completions", json=payload)
        try:
            return await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc


def upstream_error(status: int, content: bytes, headers: httpx.Headers, model: str | None = None) -> DomainError:
    """The API's error for an inference server's non-200 answer (OpenAI's shape or vLLM's older flat one)."""
    try:
        body = json.loads(content)
    except ValueError:
        body = {}
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        err = body if isinstance(body, dict) else {}
    message = str(err.get("message") or f"The inference server answered {status}.")
    param = err.get("param") if isinstance(err.get("param"), str) else None
    code = err.get("code") if isinstance(err.get("code"), str) else None
    if status == 404:
        return NotFound(f"The model '{model}' is not available on the inference server.", param="model")
    if status == 400:
        return InvalidRequest(message, param=param, code=code)
    if status == 429:
        try:
            retry_after = int(float(headers.get("Retry-After", "1")))
        except ValueError:
            retry_after = 1
        return RateLimited(message, retry_after=retry_after, retryable=True)
    return ServiceUnavailable(f"The inference server failed ({status}): {message}", code="inference_failed")
