"""A job's files, checkpoints and adapter through the API with ``IPO_STORAGE_URL=s3://...`` on a real
S3-compatible server (moto's standalone server on loopback): the bytes live in the bucket, come back
through ``/v1`` and ``/internal/v1`` unchanged, and deletes and refused uploads leave no object."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from urllib.parse import urlparse

import boto3
import httpx
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.api import worker_steps
from tests.api.conftest import WORKER, RecordingDoorbell


@pytest.fixture
def s3_url(s3_env: Callable[[], str]) -> str:
    return s3_env()


@pytest.fixture
def s3_client(settings: Settings, s3_url: str) -> Iterator[TestClient]:
    s3_settings = settings.model_copy(update={"storage_url": s3_url})
    with TestClient(create_app(s3_settings, doorbell=RecordingDoorbell())) as c:
        yield c


def _objects(url: str) -> dict[str, int]:
    parsed = urlparse(url)
    listing = boto3.session.Session().client("s3").list_objects_v2(Bucket=parsed.netloc)
    return {o["Key"]: o["Size"] for o in listing.get("Contents", [])}


def test_job_files_checkpoints_and_adapter_live_in_the_bucket(
    s3_client: TestClient, s3_url: str, auth: dict[str, str], good_jsonl: bytes
) -> None:
    client = s3_client
    r = client.post(
        "/v1/files", headers=auth, files={"file": ("train.jsonl", good_jsonl)}, data={"purpose": "fine-tune"}
    )
    assert r.status_code == 200, r.text
    training = r.json()
    assert training["bytes"] == len(good_jsonl)
    prefix = urlparse(s3_url).path.strip("/")
    key = next(k for k in _objects(s3_url) if k.endswith(training["id"]))
    assert key.startswith(prefix + "/") and _objects(s3_url)[key] == len(good_jsonl)

    # Job creation reads the training file back (validation, prompt lengths) from the bucket.
    r = client.post(
        "/v1/fine_tuning/jobs", headers=auth, json={"model": "tiny-mistral", "training_file": training["id"]}
    )
    assert r.status_code == 200, r.text
    job_id = r.json()["id"]

    # The worker side: claim, fetch the data through /internal/v1, upload a checkpoint and the adapter.
    token = worker_steps.claim(client, WORKER, job_id)
    assert client.get(f"/internal/v1/files/{training['id']}/content", headers=WORKER).content == good_jsonl
    worker_steps.add_checkpoint(client, WORKER, job_id, token, 1)
    adapter_bytes = bytes(range(256)) * 4096  # 1 MiB, not text
    r = client.post(
        f"/internal/v1/jobs/{job_id}/artifacts",
        headers=WORKER,
        data={"lease_token": token, "name": "adapter"},
        files={"file": ("adapter.zip", adapter_bytes)},
    )
    assert r.status_code == 200, r.text
    adapter_id = r.json()["file_id"]
    r = client.post(
        f"/internal/v1/jobs/{job_id}/finish",
        headers=WORKER,
        json={"lease_token": token, "adapter_file_id": adapter_id, "trained_tokens": 10},
    )
    assert r.json()["status"] == "succeeded", r.text

    objects = _objects(s3_url)
    assert len(objects) == 3  # training file, checkpoint, adapter
    assert any(k.endswith(adapter_id) and size == len(adapter_bytes) for k, size in objects.items())
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth).json()
    assert job["result_files"] == [adapter_id]
    assert client.get(f"/v1/files/{adapter_id}/content", headers=auth).content == adapter_bytes

    # Deleting the training file removes its object after the commit.
    assert client.delete(f"/v1/files/{training['id']}", headers=auth).status_code == 200
    assert not any(k.endswith(training["id"]) for k in _objects(s3_url))


def test_refused_uploads_leave_no_object(s3_client: TestClient, s3_url: str, auth: dict[str, str]) -> None:
    too_big = b"x" * 200_001  # settings.max_upload_bytes is 200_000
    r = s3_client.post("/v1/files", headers=auth, files={"file": ("big.jsonl", too_big)}, data={"purpose": "fine-tune"})
    assert r.status_code == 413, r.text
    # A reused Idempotency-Key with another body: the second upload is refused after it was stored.
    first = s3_client.post(
        "/v1/files",
        headers={**auth, "Idempotency-Key": "k1"},
        files={"file": ("a.jsonl", b'{"prompt": "a"}\n')},
        data={"purpose": "fine-tune"},
    )
    assert first.status_code == 200, first.text
    second = s3_client.post(
        "/v1/files",
        headers={**auth, "Idempotency-Key": "k1"},
        files={"file": ("b.jsonl", b'{"prompt": "b"}\n')},
        data={"purpose": "fine-tune"},
    )
    assert second.status_code == 422, second.text
    assert list(_objects(s3_url)) == [k for k in _objects(s3_url) if k.endswith(first.json()["id"])]
    assert len(_objects(s3_url)) == 1


def test_downloads_redirect_to_presigned_urls_when_configured(
    settings: Settings, s3_url: str, s3_server: str, auth: dict[str, str], good_jsonl: bytes
) -> None:
    """``IPO_STORAGE_PRESIGN_SECONDS``: ``GET /v1/files/{id}/content`` answers 307 to the object at the public
    endpoint, and the bytes come from the store with no API key; unset, the API streams them itself."""
    public = s3_server.replace("127.0.0.1", "localhost")
    update = {"storage_url": s3_url, "storage_presign_seconds": 120, "storage_public_endpoint_url": public}
    with TestClient(create_app(settings.model_copy(update=update), doorbell=RecordingDoorbell())) as client:
        r = client.post(
            "/v1/files", headers=auth, files={"file": ("train.jsonl", good_jsonl)}, data={"purpose": "fine-tune"}
        )
        file_id = r.json()["id"]
        r = client.get(f"/v1/files/{file_id}/content", headers=auth, follow_redirects=False)
        assert r.status_code == 307, r.text
        location = r.headers["location"]
        assert location.startswith(public + "/") and "X-Amz-Expires=120" in location
        assert r.headers["cache-control"] == "no-store" and r.content == b""
        got = httpx.get(location)
        assert got.status_code == 200 and got.content == good_jsonl
        assert got.headers["content-disposition"] == 'attachment; filename="train.jsonl"'
        assert client.get("/v1/files/file-nope/content", headers=auth, follow_redirects=False).status_code == 404

    with TestClient(create_app(settings.model_copy(update={"storage_presign_seconds": 120}))) as client:
        r = client.post(  # file:// has no URLs of its own: the same setting streams
            "/v1/files", headers=auth, files={"file": ("train.jsonl", good_jsonl)}, data={"purpose": "fine-tune"}
        )
        r = client.get(f"/v1/files/{r.json()['id']}/content", headers=auth, follow_redirects=False)
        assert r.status_code == 200 and r.content == good_jsonl


def test_a_missing_bucket_is_a_503_and_readyz_says_which(
    settings: Settings, s3_env: Callable[[], str], auth: dict[str, str], good_jsonl: bytes
) -> None:
    """A misconfigured store (here: a bucket nobody created) is not a bare 500: uploads answer 503 with
    ``Retry-After`` and record nothing, and ``/readyz`` names the bucket while staying 200 (``degraded``:
    the rest of the API works, and a store outage must not empty the load balancer)."""
    s3_env()  # the AWS environment pointed at the test server
    missing = settings.model_copy(update={"storage_url": "s3://ipo-nobody-made-this/artifacts"})
    with TestClient(create_app(missing, doorbell=RecordingDoorbell())) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["status"] == "degraded"
        assert ready.json()["checks"]["storage"] == "bucket 'ipo-nobody-made-this': NoSuchBucket"
        r = client.post(
            "/v1/files", headers=auth, files={"file": ("train.jsonl", good_jsonl)}, data={"purpose": "fine-tune"}
        )
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] and r.json()["error"]["code"] == "service_unavailable"
        assert "Artifact storage is unavailable" in r.json()["error"]["message"]
        assert client.get("/v1/files", headers=auth).json()["data"] == []
