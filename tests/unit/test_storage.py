"""The storage backends against one contract: ``file://`` on a temp dir and ``s3://`` on a real
S3-compatible server (moto's standalone server, started on loopback by the ``s3_server`` fixture)."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import pytest

from app.storage import Storage, open_storage
from app.storage.base import TooLarge


@pytest.fixture(params=["file", "s3"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "file":
        return f"file://{tmp_path / 'store'}"
    new_bucket: Callable[[], str] = request.getfixturevalue("s3_env")
    return new_bucket()


@pytest.fixture
def store(store_url: str) -> Storage:
    return open_storage(store_url)


class Chunked(io.RawIOBase):
    """A non-seekable stream of ``size`` pseudo-random bytes that can fail after ``fail_after`` bytes
    (an upload whose client disconnects)."""

    def __init__(self, size: int, fail_after: int | None = None) -> None:
        self.left = size
        self.sent = 0
        self.fail_after = fail_after
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self.fail_after is not None and self.sent >= self.fail_after:
            raise ConnectionResetError("client went away")
        n = self.left if n is None or n < 0 else min(n, self.left)
        data = os.urandom(n)
        self.left -= n
        self.sent += n
        self.digest.update(data)
        return data


def test_round_trip(store: Storage) -> None:
    body = b"hello\n" * 1000
    obj = store.put_stream("proj/file-1", io.BytesIO(body))
    assert (obj.key, obj.size, obj.sha256) == ("proj/file-1", len(body), hashlib.sha256(body).hexdigest())
    assert store.exists("proj/file-1")
    assert b"".join(store.iter_bytes("proj/file-1")) == body
    with store.open("proj/file-1") as fh:
        assert fh.read() == body
    with store.local_copy("proj/file-1") as path:
        assert path.read_bytes() == body


def test_empty_object(store: Storage) -> None:
    obj = store.put_stream("proj/empty", io.BytesIO(b""))
    assert obj.size == 0 and obj.sha256 == hashlib.sha256(b"").hexdigest()
    assert b"".join(store.iter_bytes("proj/empty")) == b""


def test_overwrite_replaces_whole_object(store: Storage) -> None:
    store.put_stream("k/a", io.BytesIO(b"first version, longer"))
    store.put_stream("k/a", io.BytesIO(b"second"))
    assert b"".join(store.iter_bytes("k/a")) == b"second"


def test_missing_key(store: Storage) -> None:
    assert not store.exists("proj/nope")
    with pytest.raises(FileNotFoundError):
        b"".join(store.iter_bytes("proj/nope"))
    with pytest.raises(FileNotFoundError), store.local_copy("proj/nope"):
        pass
    store.delete("proj/nope")  # idempotent


def test_delete(store: Storage) -> None:
    store.put_stream("proj/gone", io.BytesIO(b"x"))
    store.delete("proj/gone")
    assert not store.exists("proj/gone")


def test_too_large_stores_nothing(store: Storage) -> None:
    with pytest.raises(TooLarge):
        store.put_stream("proj/big", io.BytesIO(b"x" * 101), max_bytes=100)
    assert not store.exists("proj/big")
    obj = store.put_stream("proj/exact", io.BytesIO(b"x" * 100), max_bytes=100)
    assert obj.size == 100


@pytest.mark.parametrize("key", ["../escape", "a/../../b", "/abs"])
def test_keys_cannot_escape(store: Storage, key: str) -> None:
    with pytest.raises(ValueError, match="escapes"):
        store.put_stream(key, io.BytesIO(b"x"))


# Multipart: 12 MiB through 8 MiB parts (two parts; S3's minimum part is 5 MiB).
BIG = 12 << 20


def test_large_stream_round_trips_in_parts(store: Storage) -> None:
    src = Chunked(BIG)
    obj = store.put_stream("jobs/j1/adapter.zip", src)  # type: ignore[arg-type]
    assert obj.size == BIG and obj.sha256 == src.digest.hexdigest()
    digest = hashlib.sha256()
    largest = 0
    for chunk in store.iter_bytes("jobs/j1/adapter.zip"):
        digest.update(chunk)
        largest = max(largest, len(chunk))
    assert digest.hexdigest() == src.digest.hexdigest()
    assert largest <= 1 << 20  # streamed back in bounded chunks


@pytest.mark.parametrize("failure", ["too_large", "client_gone"])
def test_failed_large_upload_leaves_nothing(store: Storage, store_url: str, failure: str) -> None:
    error: type[Exception]
    if failure == "too_large":
        src, limit, error = Chunked(BIG), 10 << 20, TooLarge
    else:
        src, limit, error = Chunked(BIG, fail_after=9 << 20), None, ConnectionResetError
    with pytest.raises(error):
        store.put_stream("jobs/j2/ckpt.zip", src, max_bytes=limit)  # type: ignore[arg-type]
    assert not store.exists("jobs/j2/ckpt.zip")
    if store_url.startswith("s3://"):
        # The multipart upload was started (more than one part was read) and then aborted: no parts linger.
        import boto3

        bucket = urlparse(store_url).netloc
        client = boto3.session.Session().client("s3")
        assert client.list_objects_v2(Bucket=bucket).get("KeyCount") == 0
        assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    else:
        leftovers = [p for p in Path(urlparse(store_url).path).rglob("*") if p.is_file()]
        assert leftovers == []


def test_s3_url_needs_a_bucket() -> None:
    with pytest.raises(ValueError, match="no bucket"):
        open_storage("s3:///prefix")
    with pytest.raises(ValueError, match="supported: file://, s3://"):
        open_storage("gs://bucket/x")


def test_s3_prefix_is_applied(s3_env: Callable[[], str]) -> None:
    import boto3

    url = s3_env()
    store = open_storage(url)
    store.put_stream("p/f", io.BytesIO(b"abc"))
    bucket = urlparse(url).netloc
    keys = [o["Key"] for o in boto3.session.Session().client("s3").list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == ["artifacts/p/f"]


def test_presigned_url_serves_the_object_as_an_attachment(store: Storage, store_url: str) -> None:
    """``s3://``: a SigV4 URL anyone can GET the bytes from (no API key), named as the file; ``file://``
    has no such URLs (``None``: the API streams)."""
    import httpx

    data = os.urandom(3000)
    store.put_stream("p/f", io.BytesIO(data))
    url = store.presigned_url("p/f", 60, 'adapter "v1".zip')
    if store_url.startswith("file://"):
        assert url is None
        return
    assert url is not None and "X-Amz-Algorithm=AWS4-HMAC-SHA256" in url and "X-Amz-Expires=60" in url
    r = httpx.get(url)
    assert r.status_code == 200 and r.content == data
    assert r.headers["content-disposition"] == 'attachment; filename="adapter v1.zip"'
    assert r.headers["content-type"] == "application/octet-stream"


def test_presigned_urls_are_signed_for_the_public_endpoint(s3_env: Callable[[], str], s3_server: str) -> None:
    """Clients may reach the store at another address than the API (``http://minio:9000`` inside compose,
    a public name outside): the URL names, and is signed for, ``IPO_STORAGE_PUBLIC_ENDPOINT_URL``."""
    import httpx

    public = s3_server.replace("127.0.0.1", "localhost")
    store = open_storage(s3_env(), public_endpoint_url=public)
    store.put_stream("p/f", io.BytesIO(b"abc"))
    url = store.presigned_url("p/f", 60, "f.bin")
    assert url is not None and url.startswith(public + "/")
    assert "X-Amz-SignedHeaders=host" in url
    assert httpx.get(url).content == b"abc"


def test_check_says_whether_the_store_can_be_used(store: Storage, store_url: str, tmp_path: Path) -> None:
    """``None`` for a usable store; a short reason otherwise (a bucket that does not exist, a root that is
    not a directory), never an exception: ``/readyz`` and the startup log show it."""
    assert store.check() is None
    if store_url.startswith("s3://"):
        missing = open_storage(f"s3://ipo-missing-{os.getpid()}/x")
        assert missing.check() == f"bucket 'ipo-missing-{os.getpid()}': NoSuchBucket"
    else:
        root = tmp_path / "gone"
        local = open_storage(f"file://{root}")
        root.rmdir()
        assert local.check() == f"{root} is not a directory"


def test_check_gives_up_on_a_store_that_never_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """``/readyz`` calls ``check``: a store that accepts connections and never answers is reported (one try,
    short timeouts), not waited on with the SDK's defaults (60 s reads, retried)."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    held: list[object] = []
    threading.Thread(target=lambda: held.extend(server.accept() for _ in range(4)), daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    try:
        assert open_storage("s3://silent/x").check() == "bucket 'silent': ReadTimeoutError"
    finally:
        server.close()
