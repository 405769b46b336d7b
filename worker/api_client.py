"""Typed client for the API's ``/internal/v1`` (worker token), with retries (events are buffered in order
by ``worker/event_buffer.py``).

Transient failures (connection errors, timeouts, 429, 5xx) are retried with exponential backoff and
jitter until a deadline, then raised as :class:`ApiUnavailable`. A 409 means the worker was fenced off
(or, on claim, that there is nothing to claim) and is never retried. Events are buffered in order with
a per-attempt ``seq`` so an outage delays them but never loses or doubles them: the API drops an
``(attempt, seq)`` it already has, which makes re-posting a batch whose response was lost harmless.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

import httpx
from pydantic import BaseModel

from contracts.internal import (
    ClaimRequest,
    ClaimResponse,
    ControlResponse,
    EventsRequest,
    EventsResponse,
    FailRequest,
    FinishRequest,
    HeartbeatRequest,
    HeartbeatResponse,
    StoppedRequest,
)

log = logging.getLogger(__name__)

INTERNAL_PREFIX = "/internal/v1"
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
MAX_EVENTS_PER_POST = 1000  # EventsRequest.events max_length
MAX_MESSAGE_CHARS = 4000  # ReportedEvent.message max_length

ResponseModel = TypeVar("ResponseModel", bound=BaseModel)


class ApiError(Exception):
    """A non-retryable answer from the API (4xx), carrying the server's error message."""

    def __init__(self, status: int, message: str, code: str | None = None, type_: str | None = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.code = code
        self.type = type_


class LeaseLost(ApiError):
    """409 on a leased write: another attempt owns the job now (or it was stopped). Stop, never retry."""


class NotClaimable(ApiError):
    """409 on claim: another worker has the job or it is not queued. The task just exits."""


class NotFound(ApiError):
    """404: unknown job or file."""


class ApiUnavailable(Exception):
    """Transient failures went on past the retry deadline (API down, overloaded or unreachable)."""


def _error_from_response(response: httpx.Response) -> tuple[str, str | None, str | None]:
    try:
        body = response.json()
        error = body["error"]
        return str(error.get("message") or response.reason_phrase), error.get("code"), error.get("type")
    except (ValueError, KeyError, TypeError, AttributeError):
        text = response.text.strip()[:500]
        return text or response.reason_phrase, None, None


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


class ApiClient:
    """One per task. Thread-safe (httpx.Client is); the supervisor's threads share it."""

    def __init__(
        self,
        api_url: str,
        token: str,
        *,
        retry_seconds: float = 300.0,
        timeout: float = 60.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = httpx.Client(
            base_url=api_url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            transport=transport,
        )
        self.retry_seconds = retry_seconds
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max

    # ---- lifecycle ----

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ---- core ----

    def _sleep_for(self, attempt: int, response: httpx.Response | None) -> float:
        delay = min(self.backoff_max, self.backoff_initial * (2**attempt))
        delay *= 0.5 + random.random() / 2  # jitter: workers that lost the API together do not return together
        hinted = _retry_after(response) if response is not None else None
        if hinted is not None:
            delay = max(delay, min(hinted, self.backoff_max))
        return delay

    def request(
        self,
        method: str,
        path: str,
        *,
        build: Callable[[], Mapping[str, Any]] | None = None,
        retry_seconds: float | None = None,
        conflict: type[ApiError] = LeaseLost,
        handle: Callable[[httpx.Response], Any] | None = None,
    ) -> Any:
        """Send with retries. ``build`` makes fresh request kwargs per try (uploads reopen their file).

        ``handle`` consumes a streamed 2xx response (downloads); otherwise the parsed JSON is returned.
        """
        deadline = time.monotonic() + (self.retry_seconds if retry_seconds is None else retry_seconds)
        attempt = 0
        while True:
            response: httpx.Response | None = None
            failure: str
            try:
                kwargs = dict(build()) if build is not None else {}
                with self._http.stream(method, path, **kwargs) as response:
                    if response.is_success:
                        if handle is not None:
                            return handle(response)
                        response.read()
                        return response.json() if response.content else None
                    response.read()
                    if response.status_code not in RETRY_STATUSES:
                        message, code, type_ = _error_from_response(response)
                        status = response.status_code
                        if status == 409:
                            raise conflict(status, message, code, type_)
                        if status == 404:
                            raise NotFound(status, message, code, type_)
                        raise ApiError(status, message, code, type_)
                    failure = f"HTTP {response.status_code}"
            except httpx.TransportError as exc:  # connect/read/write errors and timeouts
                failure = f"{type(exc).__name__}: {exc}"
            delay = self._sleep_for(attempt, response)
            if time.monotonic() + delay > deadline:
                raise ApiUnavailable(f"{method} {path}: gave up after {attempt + 1} tries ({failure})")
            log.warning("%s %s failed (%s); retrying in %.1fs", method, path, failure, delay)
            time.sleep(delay)
            attempt += 1

    def _post_json(
        self,
        path: str,
        body: BaseModel,
        response_model: type[ResponseModel],
        *,
        retry_seconds: float | None = None,
        conflict: type[ApiError] = LeaseLost,
    ) -> ResponseModel:
        payload = body.model_dump(mode="json")
        data = self.request(
            "POST", path, build=lambda: {"json": payload}, retry_seconds=retry_seconds, conflict=conflict
        )
        return response_model.model_validate(data)

    def _post_ack(self, path: str, body: BaseModel, *, retry_seconds: float | None = None) -> None:
        payload = body.model_dump(mode="json")
        self.request("POST", path, build=lambda: {"json": payload}, retry_seconds=retry_seconds)

    @staticmethod
    def _job(job_id: str, action: str) -> str:
        return f"{INTERNAL_PREFIX}/jobs/{job_id}/{action}"

    # ---- endpoints ----

    def claim(self, job_id: str, worker_id: str) -> ClaimResponse:
        return self._post_json(
            self._job(job_id, "claim"), ClaimRequest(worker_id=worker_id), ClaimResponse, conflict=NotClaimable
        )

    def heartbeat(
        self, job_id: str, body: HeartbeatRequest, *, retry_seconds: float | None = None
    ) -> HeartbeatResponse:
        return self._post_json(self._job(job_id, "heartbeat"), body, HeartbeatResponse, retry_seconds=retry_seconds)

    def control(
        self, job_id: str, status: str | None, *, wait_seconds: float, retry_seconds: float | None = None
    ) -> ControlResponse:
        """Long-poll the job's requested action: answers once its status is not ``status`` (at once when
        None) or after ``wait_seconds`` (at most ``contracts.internal.CONTROL_WAIT_SECONDS_MAX``)."""
        params: dict[str, Any] = {"wait_seconds": wait_seconds}
        if status is not None:
            params["status"] = status
        timeout = httpx.Timeout(wait_seconds + 30.0, connect=10.0)  # the server holds it up to wait_seconds
        data = self.request(
            "GET",
            self._job(job_id, "control"),
            build=lambda: {"params": params, "timeout": timeout},
            retry_seconds=retry_seconds,
        )
        return ControlResponse.model_validate(data)

    def post_events(self, job_id: str, body: EventsRequest, *, retry_seconds: float | None = None) -> EventsResponse:
        return self._post_json(self._job(job_id, "events"), body, EventsResponse, retry_seconds=retry_seconds)

    def finish(self, job_id: str, body: FinishRequest) -> None:
        self._post_ack(self._job(job_id, "finish"), body)

    def fail(self, job_id: str, body: FailRequest) -> None:
        self._post_ack(self._job(job_id, "fail"), body)

    def stopped(self, job_id: str, body: StoppedRequest) -> None:
        self._post_ack(self._job(job_id, "stopped"), body)

    def download(self, path: str, dest: Path) -> Path:
        """GET ``path`` (relative to the API base URL) into ``dest``, atomically; retried from scratch."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(dest.name + ".part")

        def save(response: httpx.Response) -> Path:
            with open(partial, "wb") as out:
                out.writelines(response.iter_bytes(1024 * 1024))
            partial.replace(dest)
            return dest

        try:
            result: Path = self.request("GET", "/" + path.lstrip("/"), handle=save)
        finally:
            partial.unlink(missing_ok=True)
        return result

    def download_file(self, file_id: str, dest: Path) -> Path:
        return self.download(f"{INTERNAL_PREFIX}/files/{file_id}/content", dest)

    def _upload(self, path: str, fields: dict[str, str], file: Path, filename: str) -> dict[str, Any]:
        handles: list[Any] = []

        def build() -> dict[str, Any]:
            for handle in handles:  # a retry re-reads the file from the start
                handle.close()
            handles.clear()
            handles.append(open(file, "rb"))  # noqa: SIM115 - closed below; each retry reopens it
            return {"data": fields, "files": {"file": (filename, handles[0], "application/octet-stream")}}

        try:
            result: dict[str, Any] = self.request("POST", path, build=build)
        finally:
            for handle in handles:
                handle.close()
        return result

    def upload_checkpoint(
        self, job_id: str, lease_token: str, step: int, metrics: Mapping[str, Any] | None, zip_path: Path
    ) -> str:
        fields = {"lease_token": lease_token, "step": str(step), "metrics": json.dumps(dict(metrics or {}))}
        body = self._upload(self._job(job_id, "checkpoints"), fields, zip_path, Path(zip_path).name)
        return str(body["id"])

    def upload_artifact(
        self,
        job_id: str,
        lease_token: str,
        name: Literal["adapter", "metrics", "samples"],
        path: Path,
        filename: str | None = None,
    ) -> str:
        fields = {"lease_token": lease_token, "name": name}
        body = self._upload(self._job(job_id, "artifacts"), fields, path, filename or Path(path).name)
        return str(body["file_id"])
