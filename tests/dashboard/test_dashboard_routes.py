"""The dashboard's routes through a TestClient: login and its cookie, the same-origin check of POSTs,
tenancy (another project's job is a 404 page), the status filter and the cancel/pause/resume rules."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import select, update

from app.auth import LOOKUP_CHARS
from app.dashboard import routes as dashboard_routes
from app.models import ApiKey, DashboardSession
from app.models.base import utcnow
from tests.api.conftest import WORKER
from tests.api.worker_steps import claim, succeed

SAME_ORIGIN = {"Origin": "http://testserver"}


def key_of(auth: dict[str, str]) -> str:
    return auth["Authorization"].removeprefix("Bearer ")


def login(client: TestClient, auth: dict[str, str]) -> None:
    client.cookies.clear()
    r = client.post("/login", data={"api_key": key_of(auth)}, headers=SAME_ORIGIN, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/", r.text


def new_job(client: TestClient, auth: dict[str, str], upload: Any) -> str:
    file_id = upload().json()["id"]
    r = client.post("/v1/fine_tuning/jobs", headers=auth, json={"model": "tiny-mistral", "training_file": file_id})
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def test_wrong_or_malformed_key_is_a_401_login_page(client: TestClient) -> None:
    page = client.get("/login")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    for key, message in (("ipo-sk-" + "x" * 43, "Incorrect or revoked API key."), ("hello", "keys start with")):
        r = client.post("/login", data={"api_key": key}, headers=SAME_ORIGIN, follow_redirects=False)
        assert r.status_code == 401 and r.headers["content-type"].startswith("text/html")
        assert 'id="login-error"' in r.text and message in r.text
        assert "set-cookie" not in r.headers


def test_login_sets_a_session_cookie_that_is_httponly_strict_and_session_only(client: TestClient, auth) -> None:
    r = client.post("/login", data={"api_key": key_of(auth)}, headers=SAME_ORIGIN, follow_redirects=False)
    assert r.status_code == 303
    cookie = r.headers["set-cookie"]
    flags = {part.strip().split("=")[0].lower() for part in cookie.split(";")[1:]}
    assert cookie.startswith("ipo_session=ipo-ds-") and key_of(auth) not in cookie  # a session id, never the key
    assert {"httponly", "samesite", "path"} <= flags and "samesite=strict" in cookie.lower()
    assert not flags & {"max-age", "expires", "secure"}  # a browser-session cookie; plain http here
    assert client.get("/").status_code == 200

    over_https = TestClient(client.app, base_url="https://testserver")
    r = over_https.post(
        "/login", data={"api_key": key_of(auth)}, headers={"Origin": "https://testserver"}, follow_redirects=False
    )
    assert r.status_code == 303 and "secure" in r.headers["set-cookie"].lower()


def test_pages_need_a_session(client: TestClient, auth, upload) -> None:
    job_id = new_job(client, auth, upload)
    r = client.get("/", headers={"Accept": "text/html"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    r = client.get(f"/jobs/{job_id}/stream", headers={"Accept": "text/event-stream"})
    assert r.status_code == 401
    client.cookies.set("ipo_session", "ipo-sk-forged")
    r = client.get(f"/jobs/{job_id}", headers={"Accept": "text/html"}, follow_redirects=False)
    assert r.status_code == 303 and 'ipo_session=""' in r.headers["set-cookie"]
    # The public API never takes the cookie as credentials.
    login(client, auth)
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}").status_code == 401


def test_logout_clears_the_cookie(client: TestClient, auth) -> None:
    login(client, auth)
    r = client.post("/logout", headers=SAME_ORIGIN, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert 'ipo_session=""' in r.headers["set-cookie"] and "max-age=0" in r.headers["set-cookie"].lower()
    assert client.get("/", headers={"Accept": "text/html"}, follow_redirects=False).status_code == 303


def _session_hashes(client: TestClient) -> list[str]:
    with client.app.state.ctx.sessions() as session:  # type: ignore[attr-defined]
        return list(session.scalars(select(DashboardSession.id_hash)))


def test_logout_ends_the_session_even_for_a_copied_cookie(client: TestClient, auth) -> None:
    login(client, auth)
    stolen = client.cookies["ipo_session"]
    assert stolen.startswith("ipo-ds-") and key_of(auth) not in stolen
    stored = _session_hashes(client)
    assert hashlib.sha256(stolen.encode()).hexdigest() in stored and stolen not in stored  # only the hash is kept
    assert client.post("/logout", headers=SAME_ORIGIN, follow_redirects=False).status_code == 303
    assert hashlib.sha256(stolen.encode()).hexdigest() not in _session_hashes(client)

    replay = TestClient(client.app, cookies={"ipo_session": stolen})  # the cookie, copied before logout
    r = replay.get("/", headers={"Accept": "text/html"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login" and 'ipo_session=""' in r.headers["set-cookie"]
    # The raw API key is no session id either.
    replay.cookies.set("ipo_session", key_of(auth))
    assert replay.get("/", headers={"Accept": "text/html"}, follow_redirects=False).status_code == 303


def test_a_session_ends_when_it_expires_or_its_key_is_revoked(client: TestClient, auth, other_auth) -> None:
    sessions = client.app.state.ctx.sessions  # type: ignore[attr-defined]
    login(client, auth)
    assert client.get("/").status_code == 200
    with sessions() as session, session.begin():
        mine = DashboardSession.id_hash == hashlib.sha256(client.cookies["ipo_session"].encode()).hexdigest()
        session.execute(update(DashboardSession).where(mine).values(expires_at=utcnow() - timedelta(seconds=1)))
    assert client.get("/", headers={"Accept": "text/html"}, follow_redirects=False).status_code == 303

    login(client, other_auth)
    assert client.get("/").status_code == 200
    with sessions() as session, session.begin():
        prefix = ApiKey.prefix == key_of(other_auth)[:LOOKUP_CHARS]
        session.execute(update(ApiKey).where(prefix).values(revoked_at=utcnow()))
    assert client.get("/", headers={"Accept": "text/html"}, follow_redirects=False).status_code == 303
    # A new login purges expired sessions: none is kept past its end.
    r = client.post("/login", data={"api_key": key_of(auth)}, headers=SAME_ORIGIN, follow_redirects=False)
    assert r.status_code == 303
    with sessions() as session:
        assert session.scalar(select(DashboardSession).where(DashboardSession.expires_at <= utcnow())) is None


def test_posts_from_another_origin_are_refused(client: TestClient, auth, upload) -> None:
    job_id = new_job(client, auth, upload)
    login(client, auth)
    for headers in (
        {},
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Referer": "http://evil.example/page"},
        {"Origin": "http://testserver.evil.example"},
    ):
        r = client.post(f"/jobs/{job_id}/cancel", headers=headers, follow_redirects=False)
        assert r.status_code == 403 and 'data-status="403"' in r.text, (headers, r.text)
        r = client.post("/login", data={"api_key": key_of(auth)}, headers=headers, follow_redirects=False)
        assert r.status_code == 403, headers
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth).json()["status"] == "queued"
    # A browser that sends only a same-origin Referer is fine.
    r = client.post(f"/jobs/{job_id}/cancel", headers={"Referer": f"http://testserver/jobs/{job_id}"})
    assert r.status_code == 200 and 'data-status="cancelled"' in r.text


def test_another_projects_job_is_a_404_page(client: TestClient, auth, other_auth, upload) -> None:
    job_id = new_job(client, auth, upload)
    done = new_job(client, auth, upload)
    succeed(client, WORKER, done)
    adapter = client.get(f"/v1/fine_tuning/jobs/{done}", headers=auth).json()["result_files"][0]
    login(client, other_auth)
    for method, path in (
        ("GET", f"/jobs/{job_id}"),
        ("GET", f"/jobs/{job_id}/stream"),
        ("GET", f"/jobs/{job_id}/status"),
        ("POST", f"/jobs/{job_id}/cancel"),
        ("GET", f"/files/{adapter}/download"),
    ):
        r = client.request(method, path, headers=SAME_ORIGIN)
        assert r.status_code == 404 and r.headers["content-type"].startswith("text/html"), (path, r.text)
        assert 'id="error-page" data-status="404"' in r.text and "Traceback" not in r.text
    assert client.get(f"/jobs/{job_id}-0000").status_code == 404
    assert client.get("/jobs/not%20an%20id").status_code == 400
    assert job_id not in client.get("/").text
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth).json()["status"] == "queued"


def test_job_list_filters_by_status_and_pages(client: TestClient, auth, upload, monkeypatch) -> None:
    ids = [new_job(client, auth, upload) for _ in range(3)]  # newest last
    client.post(f"/v1/fine_tuning/jobs/{ids[1]}/cancel", headers=auth)
    login(client, auth)
    page = client.get("/").text
    assert all(i in page for i in ids)
    cancelled = client.get("/?status=cancelled").text
    assert ids[1] in cancelled and ids[0] not in cancelled and ids[2] not in cancelled
    queued = client.get("/?status=queued").text
    assert ids[0] in queued and ids[2] in queued and ids[1] not in queued
    assert client.get("/?status=bogus").status_code == 400

    monkeypatch.setattr(dashboard_routes, "PAGE_SIZE", 2)
    first = client.get("/").text
    assert ids[2] in first and ids[1] in first and ids[0] not in first and 'id="older"' in first
    older = client.get(f"/?after={ids[1]}").text
    assert ids[0] in older and ids[1] not in older and 'id="older"' not in older


def test_buttons_follow_the_apis_transition_rules(client: TestClient, auth, upload) -> None:
    job_id = new_job(client, auth, upload)
    login(client, auth)
    page = client.get(f"/jobs/{job_id}").text
    assert 'id="cancel"' in page and 'id="pause"' not in page  # queued: cancel only
    r = client.post(f"/jobs/{job_id}/pause", headers=SAME_ORIGIN)
    assert r.status_code == 409 and 'id="action-error"' in r.text and f"Cannot pause job {job_id}" in r.text
    claim(client, WORKER, job_id)
    r = client.post(f"/jobs/{job_id}/pause", headers=SAME_ORIGIN, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/jobs/{job_id}"
    r = client.post(f"/jobs/{job_id}/resume", headers=SAME_ORIGIN)  # the worker has not stopped yet
    assert r.status_code == 409 and "still saving its pause checkpoint" in r.text
    r = client.post(f"/jobs/{job_id}/cancel", headers=SAME_ORIGIN)
    assert r.status_code == 200 and 'id="job-status" data-status="cancelled"' in r.text
    r = client.post(f"/jobs/{job_id}/cancel", headers=SAME_ORIGIN)
    assert r.status_code == 409 and f"Cannot cancel job {job_id}: it is cancelled." in r.text
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth).json()["status"] == "cancelled"


def test_job_page_downloads_stream_and_status(client: TestClient, auth, upload) -> None:
    job_id = new_job(client, auth, upload)
    succeed(client, WORKER, job_id)
    finished = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth).json()
    login(client, auth)
    page = client.get(f"/jobs/{job_id}").text
    assert 'id="hyperparameters"' in page and 'data-terminal="true"' in page and 'id="cancel"' not in page
    adapter = finished["result_files"][0]
    assert f'href="/files/{adapter}/download"' in page
    r = client.get(f"/files/{adapter}/download")
    assert r.status_code == 200 and r.content == b"adapter-bytes"
    assert r.headers["content-disposition"] == 'attachment; filename="adapter.zip"'
    checkpoint = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", headers=auth).json()["data"][0]["id"]
    assert f"/jobs/{job_id}/checkpoints/{checkpoint}/download" in page
    r = client.get(f"/jobs/{job_id}/checkpoints/{checkpoint}/download")
    assert r.status_code == 200 and r.content == b"PK-not-really-a-zip"
    assert client.get(f"/jobs/{job_id}/checkpoints/ftckpt-nope/download").status_code == 404
    assert client.get(f"/jobs/{job_id}/status").json() == {"status": "succeeded", "step": None, "total_steps": None}
    stream = client.get(f"/jobs/{job_id}/stream")
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert "event: fine_tuning.job.event" in stream.text and stream.text.rstrip().endswith("data: [DONE]")
    assert "Checkpoint saved at step 1" in stream.text


def test_dashboard_is_not_in_the_openapi_schema(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert not [p for p in paths if p == "/" or p.startswith(("/jobs", "/login", "/logout", "/files", "/static"))]
    assert client.get("/static/vendor/uplot/uPlot.iife.min.js").status_code == 200


def test_samples_reach_the_job_page_as_data_not_markup(client: TestClient, auth, upload) -> None:
    """A worker's samples event (worker/training/samples.py) is replayed to the page's stream as JSON;
    the page renders it with textContent (job.js; the browser test checks that in Chromium)."""
    job_id = new_job(client, auth, upload)
    token = claim(client, WORKER, job_id)
    sample = {
        "prompt": "<script>alert(1)</script>",
        "chosen": "a",
        "rejected": "b",
        "reference_reply": "<b>ref</b>",
        "policy_reply": "pol",
        **dict.fromkeys(
            ("policy_logp_chosen", "policy_logp_rejected", "reference_logp_chosen", "reference_logp_rejected"), -1.0
        ),
    }
    event = {
        "seq": 0,
        "message": "Samples at step 2: 1 prompts from the validation file",
        "data": {"step": 2, "source": "validation file", "samples": [sample]},
        "created_at": 1,
    }
    r = client.post(
        f"/internal/v1/jobs/{job_id}/events", headers=WORKER, json={"lease_token": token, "events": [event]}
    )
    assert r.status_code == 200, r.text
    login(client, auth)
    page = client.get(f"/jobs/{job_id}").text
    assert 'id="samples"' in page and 'id="samples-table"' in page and "<script>alert(1)" not in page
    with client.stream("GET", f"/jobs/{job_id}/stream") as stream:
        for line in stream.iter_lines():
            if line.startswith("data:") and "Samples at step 2" in line:
                data = json.loads(line.removeprefix("data:"))["data"]
                break
    assert data["samples"][0]["prompt"] == "<script>alert(1)</script>" and data["step"] == 2
