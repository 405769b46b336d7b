"""The official ``openai`` SDK, unchanged but for ``base_url``, against a live server (real socket).

Covers files (create, retrieve, list, content, delete), fine-tuning jobs (create with ``ipo`` and ``dpo``
methods, auto-paginated list, retrieve, events, checkpoints, cancel, pause, resume), models, the error
classes the SDK maps statuses to, and ``Idempotency-Key`` making the SDK's own retries safe. The worker
side is played over ``/internal/v1`` with the worker token, as a real worker would.
"""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import openai
import pytest
from openai import OpenAI

from ipo_cli.http import ApiClient
from tests.api import worker_steps
from tests.sdk.conftest import MAX_UPLOAD_BYTES, WORKER_TOKEN, LiveServer, serve

WORKER = {"Authorization": f"Bearer {WORKER_TOKEN}"}


def _pref(i: int) -> str:
    return json.dumps(
        {
            "prompt": [{"role": "user", "content": f"What is {i} plus 1?"}],
            "chosen": [{"role": "assistant", "content": f"{i} plus 1 is {i + 1}."}],
            "rejected": [{"role": "assistant", "content": f"{i} plus 1 is {i + 3}."}],
        }
    )


DATA = ("\n".join(_pref(i) for i in range(8)) + "\n").encode()
IPO: Any = {"type": "ipo", "ipo": {"hyperparameters": {"beta": 0.1, "n_epochs": 1}, "lora": {"r": 8}}}
DPO: Any = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1}}}


@pytest.fixture
def client(live_server: LiveServer) -> OpenAI:
    return OpenAI(base_url=f"{live_server.url}/v1", api_key=live_server.new_key(), max_retries=2)


@pytest.fixture
def worker(live_server: LiveServer) -> httpx.Client:
    return live_server.worker()


def test_files_round_trip(client: OpenAI, live_server: LiveServer) -> None:
    created = client.files.create(file=("train.jsonl", DATA), purpose="fine-tune")
    assert created.id.startswith("file-") and created.status == "processed" and created.bytes == len(DATA)
    assert client.files.retrieve(created.id).filename == "train.jsonl"
    assert client.files.content(created.id).content == DATA
    second = client.files.create(file=("more.jsonl", DATA), purpose="fine-tune")
    assert [f.id for f in client.files.list()] == [second.id, created.id]
    assert [f.id for f in client.files.list(order="asc", limit=1)] == [created.id, second.id]  # auto-paginated
    assert [f.id for f in client.files.list(purpose="fine-tune", limit=1).data] == [second.id]

    deleted = client.files.delete(created.id)
    assert deleted.id == created.id and deleted.deleted is True and deleted.object == "file"
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(created.id)
    assert [f.id for f in client.files.list()] == [second.id]


def test_jobs_ipo_and_dpo_pagination_retrieve_events(client: OpenAI, worker: httpx.Client) -> None:
    file_id = client.files.create(file=("train.jsonl", DATA), purpose="fine-tune").id
    ipo = client.fine_tuning.jobs.create(
        model="tiny-mistral", training_file=file_id, method=IPO, suffix="sdk", seed=3, metadata={"run": "sdk"}
    )
    assert ipo.status == "queued" and ipo.method is not None and ipo.method.type == "ipo" and ipo.seed == 3
    dpo = client.fine_tuning.jobs.create(model="tiny-mistral", training_file=file_id, method=DPO)
    assert dpo.method is not None and dpo.method.type == "dpo" and dpo.method.dpo is not None
    more = [client.fine_tuning.jobs.create(model="tiny-mistral", training_file=file_id).id for _ in range(3)]

    listed = [job.id for job in client.fine_tuning.jobs.list(limit=2)]  # three pages, followed by the SDK
    assert listed == [*reversed(more), dpo.id, ipo.id]
    first_page = client.fine_tuning.jobs.list(limit=2)
    assert len(first_page.data) == 2 and first_page.has_more and first_page.has_next_page()
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"run": "sdk"})] == [ipo.id]

    got = client.fine_tuning.jobs.retrieve(ipo.id)
    assert (
        got.id == ipo.id and got.training_file == file_id and (got.model_extra or {})["user_provided_suffix"] == "sdk"
    )
    events = list(client.fine_tuning.jobs.list_events(ipo.id, limit=1))  # auto-paginated too
    assert len(events) >= 2 and all(e.object == "fine_tuning.job.event" for e in events)
    assert "Created fine-tuning job" in events[-1].message

    # A worker runs the DPO job to the end: checkpoints and the fine-tuned model appear.
    worker_steps.succeed(worker, WORKER, dpo.id)
    done = client.fine_tuning.jobs.retrieve(dpo.id)
    assert done.status == "succeeded" and done.fine_tuned_model == f"ft:tiny-mistral:ipo:{dpo.id}"
    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(dpo.id))
    assert [c.step_number for c in checkpoints] == [1]
    assert checkpoints[0].fine_tuned_model_checkpoint.startswith(done.fine_tuned_model)
    assert checkpoints[0].fine_tuning_job_id == dpo.id
    for job_id in [ipo.id, *more]:
        client.fine_tuning.jobs.cancel(job_id)


def test_cancel_pause_resume(client: OpenAI, worker: httpx.Client) -> None:
    file_id = client.files.create(file=("train.jsonl", DATA), purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(model="tiny-mistral", training_file=file_id, method=IPO)
    token = worker_steps.claim(worker, WORKER, job.id)
    assert client.fine_tuning.jobs.retrieve(job.id).status == "running"
    assert client.fine_tuning.jobs.pause(job.id).status == "paused"
    worker_steps.stopped(worker, WORKER, job.id, token)  # the worker saved its checkpoint and stopped
    assert client.fine_tuning.jobs.resume(job.id).status == "queued"
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    with pytest.raises(openai.ConflictError) as err:
        client.fine_tuning.jobs.cancel(job.id)
    assert err.value.status_code == 409 and err.value.code == "invalid_state"
    assert err.value.response.headers["x-should-retry"] == "false"  # the SDK did not retry it


def test_models(client: OpenAI, worker: httpx.Client) -> None:
    assert [(m.id, m.owned_by) for m in client.models.list()] == [("tiny-mistral", "system")]
    assert client.models.retrieve("tiny-mistral").object == "model"
    file_id = client.files.create(file=("train.jsonl", DATA), purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(model="tiny-mistral", training_file=file_id, suffix="m1")
    worker_steps.succeed(worker, WORKER, job.id)
    name = client.fine_tuning.jobs.retrieve(job.id).fine_tuned_model
    assert name is not None and ":" in name
    model = client.models.retrieve(name)
    assert model.id == name and model.owned_by == job.organization_id
    assert {m.id for m in client.models.list()} == {"tiny-mistral", name}
    assert client.models.delete(name).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve(name)
    with pytest.raises(openai.PermissionDeniedError):
        client.models.delete("tiny-mistral")


def test_error_classes(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        client.fine_tuning.jobs.retrieve("ftjob-doesnotexist")
    assert nf.value.status_code == 404 and nf.value.code == "not_found"
    file_id = client.files.create(file=("train.jsonl", DATA), purpose="fine-tune").id
    with pytest.raises(openai.BadRequestError) as bad:
        bad_lora: Any = {"type": "ipo", "ipo": {"lora": {"r": 0}}}
        client.fine_tuning.jobs.create(model="tiny-mistral", training_file=file_id, method=bad_lora)
    assert bad.value.param == "method.ipo.lora.r"
    with pytest.raises(openai.BadRequestError) as bad:
        client.fine_tuning.jobs.create(model="gpt-4o", training_file=file_id)
    assert bad.value.param == "model" and bad.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=str(client.base_url), api_key="ipo-sk-wrong", max_retries=0).models.list()


def test_idempotency_key_makes_sdk_retries_safe(client: OpenAI) -> None:
    file_id = client.files.create(file=("train.jsonl", DATA), purpose="fine-tune").id
    key = {"Idempotency-Key": f"sdk-{uuid.uuid4()}"}
    first = client.fine_tuning.jobs.create(model="tiny-mistral", training_file=file_id, extra_headers=key)
    retried = client.fine_tuning.jobs.with_raw_response.create(
        model="tiny-mistral", training_file=file_id, extra_headers=key
    )
    assert retried.headers["Idempotent-Replayed"] == "true" and retried.parse().id == first.id
    assert [j.id for j in client.fine_tuning.jobs.list()] == [first.id]
    with pytest.raises(openai.UnprocessableEntityError):  # same key, another body
        client.fine_tuning.jobs.create(model="tiny-mistral", training_file=file_id, seed=1, extra_headers=key)
    # Without a key, each call is a new job (what the SDK's automatic retries would do after a lost answer).
    client.fine_tuning.jobs.create(model="tiny-mistral", training_file=file_id)
    assert len(client.fine_tuning.jobs.list().data) == 2


def test_chunked_oversized_upload_is_refused_over_a_real_socket(live_server: LiveServer) -> None:
    """Raw HTTP/1.1 with ``Transfer-Encoding: chunked`` and no length: the server answers 413 having read
    little more than the limit, and stores nothing."""
    key = live_server.new_key()
    before = live_server.stored_blobs()
    boundary = "b0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'
    ).encode()
    url = urlparse(live_server.url)
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(
            (
                f"POST /v1/files HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {key}\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\nTransfer-Encoding: chunked\r\n\r\n"
            ).encode()
        )
        chunk = b"x" * 65_536
        try:
            sock.sendall(f"{len(head):x}\r\n".encode() + head + b"\r\n")
            for _ in range(10 * MAX_UPLOAD_BYTES // len(chunk)):  # ten times the limit, if nobody stops us
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        except OSError:
            pass  # the server answered and closed while we were still sending: exactly the point
        response = b""
        try:
            while data := sock.recv(65_536):
                response += data
        except OSError:
            pass
    status_line, _, rest = response.partition(b"\r\n")
    assert b" 413 " in status_line, response[:500]
    headers, _, body_bytes = rest.partition(b"\r\n\r\n")
    assert b"content-length" in headers.lower()
    body = json.loads(body_bytes)
    assert body["error"]["code"] == "file_too_large" and body["error"]["param"] == "file"
    assert live_server.stored_blobs() == before


def test_file_content_follows_a_presigned_redirect(
    s3_env: Callable[[], str], s3_server: str, database_url: str, tmp_path: Path
) -> None:
    """With S3 storage and ``IPO_STORAGE_PRESIGN_SECONDS``, ``client.files.content`` gets the bytes from the
    store: the unchanged SDK follows the 307, and httpx drops the API key on the way to the other origin.
    The ``ipo`` CLI's download follows it too."""
    public = s3_server.replace("127.0.0.1", "localhost")
    with serve(
        database_url, tmp_path, storage_url=s3_env(), storage_presign_seconds="60", storage_public_endpoint_url=public
    ) as server:
        client = OpenAI(base_url=f"{server.url}/v1", api_key=server.new_key(), max_retries=0)
        file_id = client.files.create(file=("train.jsonl", DATA), purpose="fine-tune").id
        raw = client.files.with_raw_response.content(file_id)
        assert raw.http_response.url.host == "localhost" and raw.content == DATA
        assert [r.status_code for r in raw.http_response.history] == [307]
        assert "authorization" not in raw.http_response.request.headers  # the key stays with the API
        # and the CLI's download (`ipo files download`) writes the object, not the redirect's empty body
        dest = ApiClient(server.url, client.api_key).download(file_id, tmp_path / "out" / "train.jsonl")
        assert dest.read_bytes() == DATA
