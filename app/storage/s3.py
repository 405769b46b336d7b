"""``s3://BUCKET[/PREFIX]``: artifacts in an S3-compatible object store (AWS S3, MinIO, Ceph RGW, R2...).

Client: **boto3**. It is the AWS-maintained reference SDK, so it reads endpoint, region and credentials
exactly as every other AWS tool does (``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``, ``AWS_REGION`` /
``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, profiles,
instance and web-identity roles) with nothing re-implemented here; and its managed transfer layer
(s3transfer: ``upload_fileobj`` / ``download_fileobj``) already does streamed multipart uploads and ranged
downloads with retries and bounded buffers. obstore is faster but younger and its credential chain differs
from the SDKs'; fsspec/s3fs adds an asyncio layer (aiobotocore) over the same protocol that a synchronous
API does not need. boto3 is an optional extra (``pip install 'ipo-align[s3]'``) so ``file://`` installs
stay small.

Atomicity (a failed upload leaves no visible half object): the bytes go up with ``upload_fileobj``, which
sends streams shorter than the multipart threshold (8 MiB here) as one ``PutObject`` and longer ones as a
multipart upload. S3 makes neither visible until it has succeeded: a ``PutObject`` is atomic, and the parts
of a multipart upload are not an object until ``CompleteMultipartUpload``; when a read, a part or the size
limit fails, s3transfer sends ``AbortMultipartUpload``, which discards the parts. So there is no temporary
key to copy from (a copy would double the bytes written per artifact, and S3's ``CopyObject`` is itself
limited to 5 GiB in one call). tests/unit/test_storage.py checks this on a real S3 server: an over-limit
multipart upload leaves neither an object nor an incomplete upload behind.

Presigned downloads (``IPO_STORAGE_PRESIGN_SECONDS``): ``presigned_url`` signs a ``GetObject`` (SigV4, query
string) with the API's credentials, so a client fetches a large adapter straight from the store instead of
through an API process. The signature covers the host, so when clients reach the store at another address
than the API does (``http://minio:9000`` inside compose), ``public_endpoint_url``
(``IPO_STORAGE_PUBLIC_ENDPOINT_URL``) is the address the URL is signed for; signing is local, no request.

Memory: uploads read the source in 1 MiB chunks into parts of ``part_size`` bytes, at most
``max_concurrency`` parts in flight (8 MiB x 4 by default, s3transfer's defaults); downloads stream the
response body in 1 MiB chunks. Nothing holds a whole artifact.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, cast

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from app.storage.base import CHUNK, StorageUnavailable, StoredObject, TooLarge

DEFAULT_PART_SIZE = 8 << 20
"""Multipart threshold and part size, bytes: 8 MiB (s3transfer's default; S3's minimum part is 5 MiB)."""


class _HashingReader:
    """A read-only, non-seekable view of ``stream`` that counts and hashes what is read and raises
    ``TooLarge`` as soon as more than ``max_bytes`` have been read (so the upload fails, uncommitted)."""

    def __init__(self, stream: BinaryIO, max_bytes: int | None) -> None:
        self._stream = stream
        self._max = max_bytes
        self.size = 0
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def read(self, n: int = -1) -> bytes:
        chunk = self._stream.read(n if n is not None and n >= 0 else CHUNK)
        self.size += len(chunk)
        if self._max is not None and self.size > self._max:
            raise TooLarge(f"larger than {self._max} bytes")
        self.digest.update(chunk)
        return chunk


def _missing(exc: ClientError) -> bool:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    return code in {"NoSuchKey", "404", "NotFound"}


class S3Storage:
    """Objects under ``s3://bucket/prefix/KEY``. The client comes from boto3's default credential chain
    (environment, config files, roles); ``client`` may be passed in (tests). ``part_size`` is both the
    multipart threshold and the part size in bytes (minimum 5 MiB, S3's smallest non-final part).
    ``public_endpoint_url``: the endpoint presigned URLs are signed for (default: the one the AWS SDK
    environment names, as for the client)."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: Any = None,
        part_size: int = DEFAULT_PART_SIZE,
        max_concurrency: int = 4,
        public_endpoint_url: str | None = None,
    ) -> None:
        if part_size < 5 << 20:
            raise ValueError(f"part_size must be at least 5 MiB (S3's minimum part), got {part_size}")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = client or boto3.session.Session().client(
            "s3", config=Config(retries={"mode": "standard"}, user_agent_extra="ipo-align")
        )
        # boto3 still presigns with SigV2 unless told otherwise; SigV4 is what every S3 region accepts.
        self.signer = boto3.session.Session().client(
            "s3",
            endpoint_url=public_endpoint_url,  # None: the endpoint the SDK environment names, as for `client`
            region_name=self.client.meta.region_name,
            config=Config(signature_version="s3v4", user_agent_extra="ipo-align"),
        )
        # /readyz and the startup check: one quick try, so a store that hangs cannot hold a health probe
        self.probe = boto3.session.Session().client(
            "s3", config=Config(connect_timeout=2, read_timeout=2, retries={"total_max_attempts": 1})
        )
        self.transfer = TransferConfig(
            multipart_threshold=part_size,
            multipart_chunksize=part_size,
            max_concurrency=max_concurrency,
            io_chunksize=CHUNK,
        )

    def object_key(self, key: str) -> str:
        """The S3 key of ``key``; ``ValueError`` for an absolute key or one with ``.``/``..`` parts (the
        same keys ``file://`` refuses, so both backends accept exactly the same names)."""
        parts = key.split("/")
        if not key or key.startswith("/") or any(p in {"", ".", ".."} for p in parts):
            raise ValueError(f"storage key escapes the store: {key!r}")
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_stream(self, key: str, stream: BinaryIO, max_bytes: int | None = None) -> StoredObject:
        reader = _HashingReader(stream, max_bytes)
        try:
            self.client.upload_fileobj(reader, self.bucket, self.object_key(key), Config=self.transfer)
        except (ClientError, S3UploadFailedError, BotoCoreError) as exc:  # TooLarge and the stream's own pass
            raise StorageUnavailable(f"s3://{self.bucket}: upload of {key!r} failed: {exc}") from exc
        return StoredObject(key=key, size=reader.size, sha256=reader.digest.hexdigest())

    def _body(self, key: str) -> Any:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.object_key(key))["Body"]
        except ClientError as exc:
            if _missing(exc):
                raise FileNotFoundError(f"no stored object {key!r}") from exc
            raise StorageUnavailable(f"s3://{self.bucket}: reading {key!r} failed: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageUnavailable(f"s3://{self.bucket}: reading {key!r} failed: {exc}") from exc

    def check(self) -> str | None:
        """``None`` when the bucket answers ``HeadBucket``, else its error code (``NoSuchBucket``/``404``,
        ``AccessDenied``/``403``) or the connection error. One try with 2 s timeouts (the ``probe`` client)."""
        try:
            self.probe.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", "")) or "ClientError"
            return f"bucket {self.bucket!r}: {'NoSuchBucket' if code == '404' else code}"
        except BotoCoreError as exc:
            return f"bucket {self.bucket!r}: {type(exc).__name__}"
        return None

    def open(self, key: str) -> BinaryIO:
        return cast(BinaryIO, self._body(key))

    def iter_bytes(self, key: str) -> Iterator[bytes]:
        body = self._body(key)  # raises FileNotFoundError before the first chunk, like file://
        return self._chunks(body)

    @staticmethod
    def _chunks(body: Any) -> Iterator[bytes]:
        try:
            yield from body.iter_chunks(CHUNK)
        finally:
            body.close()

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.object_key(key))

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.object_key(key))
        except ClientError as exc:
            if _missing(exc):
                return False
            raise
        return True

    @contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        if not self.exists(key):
            raise FileNotFoundError(f"no stored object {key!r}")
        fd, tmp = tempfile.mkstemp(prefix="ipo-s3-", suffix=Path(key).suffix)
        try:
            with os.fdopen(fd, "wb") as out:
                self.client.download_fileobj(self.bucket, self.object_key(key), out, Config=self.transfer)
            yield Path(tmp)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def presigned_url(self, key: str, expires_seconds: int, filename: str) -> str | None:
        """A SigV4 query-string URL for ``GetObject`` of ``key``, valid ``expires_seconds`` (S3 allows up to
        7 days), answered with ``Content-Disposition: attachment; filename="..."`` and
        ``application/octet-stream`` as the API's own download is. Does not check that the object exists."""
        safe = filename.replace('"', "").replace("\\", "")
        return cast(
            str,
            self.signer.generate_presigned_url(
                "get_object",
                Params={
                    "Bucket": self.bucket,
                    "Key": self.object_key(key),
                    "ResponseContentDisposition": f'attachment; filename="{safe}"',
                    "ResponseContentType": "application/octet-stream",
                },
                ExpiresIn=expires_seconds,
            ),
        )
