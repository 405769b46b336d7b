"""Request bodies over a real socket against uvicorn: credentials are checked before a byte of the body
is read (an anonymous client cannot make the server read or spool a large body), and a body that
stalls is answered with a 408 instead of holding the connection and a request slot for ever."""

from __future__ import annotations

import json
import socket
from typing import Any
from urllib.parse import urlparse

import pytest

from tests.sdk.conftest import BODY_TIMEOUT_SECONDS, LiveServer

ANNOUNCED = 100_000_000
"""A 100 MB body, announced and never sent: only a server that answers before reading it can answer."""
READ_TIMEOUT_S = 30 + BODY_TIMEOUT_SECONDS
"""Generous: a server that waits for the body never answers, and the read then fails (no assertion on time)."""


def _exchange(server: LiveServer, head: str, body: bytes = b"") -> tuple[int, dict[str, str], dict[str, Any], bool]:
    """Send ``head`` (request line + headers) and the start of a body, then read the whole answer. Returns
    the status, headers, JSON body, and whether the server then closed the connection."""
    url = urlparse(server.url)
    with socket.create_connection((url.hostname, url.port), timeout=READ_TIMEOUT_S) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        raw = b""
        while b"\r\n\r\n" not in raw:
            chunk = sock.recv(65_536)
            assert chunk, f"connection closed without an answer: {raw!r}"
            raw += chunk
        head_bytes, _, rest = raw.partition(b"\r\n\r\n")
        lines = head_bytes.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers["content-length"])
        while len(rest) < length:
            chunk = sock.recv(65_536)
            assert chunk, "connection closed mid-answer"
            rest += chunk
        closed = sock.recv(1) == b""
    return int(lines[0].split()[1]), headers, json.loads(rest[:length]), closed


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/internal/v1/jobs/ftjob-x/claim", "application/json"),
        ("/internal/v1/jobs/ftjob-x/checkpoints", "multipart/form-data; boundary=b0undary"),
        ("/v1/files", "multipart/form-data; boundary=b0undary"),
        ("/v1/fine_tuning/jobs", "application/json"),
    ],
)
@pytest.mark.parametrize("authorization", ["", "Authorization: Bearer ipo-sk-not-a-real-key\n"])
def test_an_anonymous_body_is_refused_before_it_is_read(
    live_server: LiveServer, path: str, content_type: str, authorization: str
) -> None:
    before = live_server.stored_blobs()
    url = urlparse(live_server.url)
    head = (
        f"POST {path} HTTP/1.1\nHost: {url.netloc}\n{authorization}Content-Type: {content_type}\n"
        f"Content-Length: {ANNOUNCED}\n"
    )
    status, headers, body, closed = _exchange(live_server, head, b'{"a": ')
    assert status == 401 and body["error"]["type"] == "authentication_error", body
    assert headers.get("connection") == "close" and closed
    assert live_server.stored_blobs() == before


def test_a_stalled_body_is_answered_with_408_and_the_connection_closed(live_server: LiveServer) -> None:
    key = live_server.new_key()
    url = urlparse(live_server.url)
    head = (
        f"POST /v1/fine_tuning/jobs HTTP/1.1\nHost: {url.netloc}\nAuthorization: Bearer {key}\n"
        "Content-Type: application/json\nContent-Length: 200\n"
    )
    status, headers, body, closed = _exchange(live_server, head, b'{"model": "tiny-mis')  # ...and nothing more
    assert status == 408 and body["error"]["code"] == "request_timeout", body
    assert headers.get("connection") == "close" and closed


def test_a_stalled_upload_is_answered_with_408(live_server: LiveServer) -> None:
    key = live_server.new_key()
    before = live_server.stored_blobs()
    url = urlparse(live_server.url)
    part = (
        b'--b0undary\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="t.jsonl"\r\n\r\n{"prompt": '
    )
    head = (
        f"POST /v1/files HTTP/1.1\nHost: {url.netloc}\nAuthorization: Bearer {key}\n"
        f"Content-Type: multipart/form-data; boundary=b0undary\nContent-Length: 100000\n"
    )
    status, _, body, closed = _exchange(live_server, head, part)
    assert status == 408 and body["error"]["param"] is None and closed, body
    assert live_server.stored_blobs() == before
