"""Artifact storage behind one interface (``Storage``): a local directory (``file://``) or an S3-compatible
bucket (``s3://``, ``app.storage.s3``), chosen by ``IPO_STORAGE_URL`` through ``open_storage``."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from app.storage.base import LocalStorage, Storage

__all__ = ["Storage", "open_storage"]


def open_storage(url: str, public_endpoint_url: str | None = None) -> Storage:
    """The backend for ``IPO_STORAGE_URL``: ``file://PATH`` or ``s3://BUCKET[/PREFIX]``.
    ``public_endpoint_url`` (``IPO_STORAGE_PUBLIC_ENDPOINT_URL``, ``s3://`` only): where clients reach the
    store, for presigned download URLs.

    Raises ``ValueError`` for any other scheme or an ``s3://`` URL without a bucket, and ``RuntimeError``
    for ``s3://`` when the ``s3`` extra (boto3) is not installed.
    """
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalStorage(Path(parsed.netloc + parsed.path))
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"IPO_STORAGE_URL {url!r} names no bucket (expected s3://BUCKET[/PREFIX])")
        from app.storage.s3 import S3Storage  # boto3 is the optional `s3` extra

        return S3Storage(
            bucket=parsed.netloc, prefix=parsed.path.strip("/"), public_endpoint_url=public_endpoint_url or None
        )
    raise ValueError(f"unsupported IPO_STORAGE_URL scheme {parsed.scheme!r} (supported: file://, s3://)")
