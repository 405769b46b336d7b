"""A real HTTP server on a loopback port that speaks the API's ``/internal/v1`` and records every call.

It keeps one job; it can be taken down (connection refused) and brought back on the same port.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

TOKEN = "test-worker-token"


@dataclass
class Upload:
    fields: dict[str, str]
    filename: str
    content: bytes
    events_before: int = 0
    """How many events the API had received when this upload arrived (the order a reader sees)."""


@dataclass
class State:
    claim: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict)
    claimed: bool = False
    action: str = "continue"
    lease_lost: bool = False
    ended_as: str | None = None
    """The job's status once the attempt reported its end (``succeeded``, ``failed``, ``paused``...)."""
    refuse_artifacts_as: str | None = None
    """``cancel``/``pause``: an artifact upload sets that action and is refused as the API does (409
    ``invalid_state``): the user stopped the job while its trainer was finishing."""
    fail_next: list[int] = field(default_factory=list)
    """Statuses to answer the next requests with (503, 429, ...), oldest first."""
    calls: list[tuple[str, str]] = field(default_factory=list)
    control_answers: int = 0
    """Answers to ``GET .../control`` (long-poll of the requested action)."""
    heartbeats: list[dict[str, Any]] = field(default_factory=list)
    heartbeat_actions: list[str] = field(default_factory=list)
    """The action each heartbeat was answered with."""
    events: list[dict[str, Any]] = field(default_factory=list)
    duplicates: int = 0
    checkpoints: list[Upload] = field(default_factory=list)
    artifacts: list[Upload] = field(default_factory=list)
    terminal: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _parse_multipart(content_type: str, body: bytes) -> tuple[dict[str, str], str, bytes]:
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    fields: dict[str, str] = {}
    filename, content = "", b""
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        if part.get_filename():
            filename, content = str(part.get_filename()), payload
        else:
            fields[str(name)] = payload.decode()
    return fields, filename, content


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, body: Any = None, raw: bytes | None = None) -> None:
        data = raw if raw is not None else json.dumps(body if body is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
        self._send(status, {"error": error})

    def _authorized(self) -> bool:
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self._error(401, "bad worker token")
            return False
        return True

    def do_GET(self) -> None:
        state = self.server.state
        if not self._authorized():
            return
        with state.lock:
            state.calls.append(("GET", self.path))
        url = urlsplit(self.path)
        if url.path.startswith("/internal/v1/jobs/") and url.path.endswith("/control"):
            return self._control(parse_qs(url.query))
        prefix = "/internal/v1/files/"
        if self.path.startswith(prefix) and self.path.endswith("/content"):
            file_id = self.path[len(prefix) : -len("/content")]
            if file_id in state.files:
                return self._send(200, raw=state.files[file_id])
        elif self.path in state.files:  # checkpoint download paths
            return self._send(200, raw=state.files[self.path])
        self._error(404, "no such file")

    def _status(self) -> str:
        """The job's status as the API would report it (``app.services.worker_protocol``)."""
        state = self.server.state
        if state.ended_as is not None:
            return state.ended_as
        return {"cancel": "cancelled", "pause": "paused"}.get(state.action, "running")

    def _control(self, query: dict[str, list[str]]) -> None:
        """Long-poll like the API: answer once the status differs from ``status`` or ``wait_seconds`` passed."""
        state = self.server.state
        known = query.get("status", [None])[0]
        deadline = time.monotonic() + float(query.get("wait_seconds", ["20"])[0])
        while known is not None and self._status() == known and time.monotonic() < deadline:
            time.sleep(0.05)
        with state.lock:
            state.control_answers += 1
        self._send(200, {"action": state.action, "status": self._status()})

    def do_POST(self) -> None:
        state = self.server.state
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        if not self._authorized():
            return
        with state.lock:
            status = state.fail_next.pop(0) if state.fail_next else None
        if status is not None:
            self.send_response(status)
            self.send_header("Retry-After", "0")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        parts = self.path.strip("/").split("/")  # internal v1 jobs {id} {action}
        action = parts[-1]
        with state.lock:
            state.calls.append(("POST", action))
            if action == "claim":
                if state.claimed:
                    return self._error(409, "job is not queued", "not_claimable")
                state.claimed = True
                return self._send(200, state.claim)
            if action in ("checkpoints", "artifacts"):
                fields, filename, content = _parse_multipart(self.headers["Content-Type"], body)
                if fields.get("lease_token") != state.claim["lease_token"] or state.lease_lost:
                    return self._error(409, "stale lease", "lease_lost")
                if action == "artifacts" and state.refuse_artifacts_as is not None:
                    state.action = state.refuse_artifacts_as
                # As the API: checkpoints while running or paused, artifacts only while running.
                if self._status() not in (("running",) if action == "artifacts" else ("running", "paused")):
                    return self._error(409, f"Job is {self._status()}.", "invalid_state")
                upload = Upload(fields, filename, content, events_before=len(state.events))
                if action == "checkpoints":
                    state.checkpoints.append(upload)
                    return self._send(200, {"id": f"ckpt-{len(state.checkpoints)}", "status": None})
                state.artifacts.append(upload)
                return self._send(200, {"file_id": f"file-{fields['name']}"})
            payload = json.loads(body)
            if payload.get("lease_token") != state.claim["lease_token"] or state.lease_lost:
                return self._error(409, "stale lease", "lease_lost")
            if action == "heartbeat":
                state.heartbeats.append(payload)
                state.heartbeat_actions.append(state.action)
                return self._send(200, {"action": state.action, "status": self._status(), "lease_seconds": 300})
            if action == "events":
                if self._status() not in ("running", "paused"):
                    return self._error(409, f"Job is {self._status()}.", "invalid_state")
                seen = {e["seq"] for e in state.events}
                accepted = 0
                for event in payload["events"]:
                    if event["seq"] in seen:
                        state.duplicates += 1
                    else:
                        state.events.append(event)
                        seen.add(event["seq"])
                        accepted += 1
                return self._send(200, {"accepted": accepted, "duplicates": len(payload["events"]) - accepted})
            if action in ("finish", "fail", "stopped"):
                state.terminal.append((action, payload))
                state.ended_as = {"finish": "succeeded", "fail": "failed"}.get(action) or (
                    self._status() if self._status() != "running" else "queued"  # stopped on shutdown: requeued
                )
                return self._send(200, {"id": state.claim["job_id"], "status": state.ended_as})
        self._error(404, "unknown endpoint")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    state: State


class FakeApi:
    def __init__(self, state: State) -> None:
        self.state = state
        self.port = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        for _ in range(50):  # the old socket may linger for a moment after a restart
            try:
                server = _Server(("127.0.0.1", self.port), _Handler)
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"cannot bind port {self.port}")
        server.state = self.state
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None
