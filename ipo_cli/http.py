"""A small HTTP client for the public API: base URL and key from flags, ``IPO_BASE_URL`` /
``IPO_API_KEY``, or the embedded default (``http://127.0.0.1:8000`` and ``./var/api_key``)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from ipo_cli.errors import CliError


def resolve_key(explicit: str | None) -> str:
    if explicit:
        return explicit
    if os.environ.get("IPO_API_KEY"):
        return os.environ["IPO_API_KEY"]
    local = Path(os.environ.get("IPO_VAR_DIR", "./var")) / "api_key"
    if local.exists():
        return local.read_text().strip()
    raise CliError("no API key: pass --api-key, set IPO_API_KEY, or run `ipo up` once to create ./var/api_key")


class ApiClient:
    def __init__(self, base_url: str | None = None, api_key: str | None = None, timeout: float = 30.0) -> None:
        self.base_url = (base_url or os.environ.get("IPO_BASE_URL") or "http://127.0.0.1:8000").rstrip("/")
        self.http = httpx.Client(
            base_url=self.base_url, timeout=timeout, headers={"Authorization": f"Bearer {resolve_key(api_key)}"}
        )

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise CliError(f"cannot reach {self.base_url}: {exc}", 4) from exc
        if response.status_code >= 400:
            raise CliError(_error_line(response), 3)
        return response

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.request(method, path, **kwargs).json()

    def upload(self, path: Path, purpose: str = "fine-tune") -> dict[str, Any]:
        if not path.is_file():
            raise CliError(f"no such file: {path}")
        with path.open("rb") as fh:
            return dict(self.json("POST", "/v1/files", files={"file": (path.name, fh)}, data={"purpose": purpose}))

    def download(self, file_id: str, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(dest.suffix + ".part")
        try:
            # follow a 307 to a presigned URL (IPO_STORAGE_PRESIGN_SECONDS): httpx drops the key on the way
            with self.http.stream("GET", f"/v1/files/{file_id}/content", follow_redirects=True) as response:
                if response.status_code >= 400:
                    response.read()
                    raise CliError(_error_line(response), 3)
                with tmp.open("wb") as out:
                    for chunk in response.iter_bytes():
                        out.write(chunk)
        except httpx.TransportError as exc:
            raise CliError(f"cannot reach {self.base_url}: {exc}", 4) from exc
        tmp.replace(dest)
        return dest

    def stream_events(self, job_id: str, last_event_id: str | None = None) -> Iterator[dict[str, Any]]:
        """Follow the job's SSE stream until it ends, reconnecting with ``Last-Event-ID`` if it drops."""
        while True:
            headers = {"Accept": "text/event-stream"}
            if last_event_id:
                headers["Last-Event-ID"] = last_event_id
            try:
                with self.http.stream(
                    "GET",
                    f"/v1/fine_tuning/jobs/{job_id}/events",
                    headers=headers,
                    timeout=httpx.Timeout(30.0, read=60.0),
                ) as response:
                    if response.status_code >= 400:
                        response.read()
                        raise CliError(_error_line(response), 3)
                    event_id, data = None, []
                    for line in response.iter_lines():
                        if line.startswith("id:"):
                            event_id = line[3:].strip()
                        elif line.startswith("data:"):
                            data.append(line[5:].strip())
                        elif line == "" and data:
                            payload = "\n".join(data)
                            data = []
                            if payload == "[DONE]":
                                return
                            last_event_id = event_id or last_event_id
                            yield json.loads(payload)
                    return
            except (httpx.ReadTimeout, httpx.RemoteProtocolError):
                continue
            except httpx.TransportError as exc:
                raise CliError(f"cannot reach {self.base_url}: {exc}", 4) from exc


def _error_line(response: httpx.Response) -> str:
    try:
        err = response.json()["error"]
        param = f" (param: {err['param']})" if err.get("param") else ""
        return f"{response.status_code} {err.get('message')}{param}"
    except (ValueError, KeyError, TypeError):
        return f"{response.status_code} {response.text[:200]}"
