"""The ``Storage`` protocol, the local-directory backend and ``open_storage`` (URL -> backend).

Writes are atomic: in the local backend bytes go to a temporary file in the same directory, are fsynced,
then renamed, so a reader never sees a half-written artifact and a crash leaves no partial object behind.
The S3 backend (``app.storage.s3``) gets the same guarantee from S3's own commit semantics.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

CHUNK = 1 << 20
"""Read/write granularity of streamed copies: 1 MiB (a bounded buffer, never a whole artifact)."""


class TooLarge(Exception):
    """The stream exceeded the size limit; nothing was stored."""


class StorageUnavailable(Exception):
    """The store could not be used (bucket missing, credentials refused, endpoint down): the request answers
    503 with ``Retry-After``; the message (logged, not shown to clients) names the store and the reason."""


@dataclass(frozen=True)
class StoredObject:
    """What ``put_stream`` stored: its key, size in bytes and the hex SHA-256 of its bytes."""

    key: str
    size: int
    sha256: str


class Storage(Protocol):
    """An artifact store addressed by relative keys (``project/file-id``, ``jobs/ID/...``).

    ``put_stream`` reads ``stream`` to its end in bounded chunks and stores it atomically (a reader sees
    the whole object or none); past ``max_bytes`` it raises ``TooLarge`` and stores nothing.
    ``iter_bytes``/``open`` stream an object back; both raise ``FileNotFoundError`` for a missing key.
    ``delete`` is idempotent. ``local_copy`` yields a local filesystem path holding the object's bytes for
    code that needs a real file (the data validators); it is the object itself for ``file://``, a
    temporary download deleted on exit otherwise. ``presigned_url`` is a URL anyone holding it can GET
    the object from for ``expires_seconds``, served as an attachment named ``filename``; ``None`` when the
    backend has no such URLs (``file://``: the API streams the bytes itself). ``check`` is ``None`` when the
    store can be written, else a short reason (``/readyz``, the startup log); backends raise
    ``StorageUnavailable`` for such failures during a request.
    """

    def put_stream(self, key: str, stream: BinaryIO, max_bytes: int | None = None) -> StoredObject: ...
    def open(self, key: str) -> BinaryIO: ...
    def iter_bytes(self, key: str) -> Iterator[bytes]: ...
    def delete(self, key: str) -> None: ...
    def exists(self, key: str) -> bool: ...
    def local_copy(self, key: str) -> AbstractContextManager[Path]: ...
    def presigned_url(self, key: str, expires_seconds: int, filename: str) -> str | None: ...
    def check(self) -> str | None: ...


class LocalStorage:
    """``file://ROOT``: objects are files under ``ROOT`` (created if missing)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def local_path(self, key: str) -> Path:
        """The file that holds ``key``; ``ValueError`` if the key would leave the store (``..``)."""
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise ValueError(f"storage key escapes the store: {key!r}")
        return path

    def put_stream(self, key: str, stream: BinaryIO, max_bytes: int | None = None) -> StoredObject:
        path = self.local_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        size = 0
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := stream.read(CHUNK):
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise TooLarge(f"larger than {max_bytes} bytes")
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return StoredObject(key=key, size=size, sha256=digest.hexdigest())

    def open(self, key: str) -> BinaryIO:
        return self.local_path(key).open("rb")

    def iter_bytes(self, key: str) -> Iterator[bytes]:
        with self.open(key) as fh:
            while chunk := fh.read(CHUNK):
                yield chunk

    def delete(self, key: str) -> None:
        self.local_path(key).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self.local_path(key).is_file()

    @contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        path = self.local_path(key)
        if not path.is_file():
            raise FileNotFoundError(f"no stored object {key!r}")
        yield path

    def presigned_url(self, key: str, expires_seconds: int, filename: str) -> str | None:
        """Always ``None``: a directory has no URLs of its own; the API streams the file."""
        return None

    def check(self) -> str | None:
        """``None`` when the root is a writable directory, else why not."""
        if not self.root.is_dir():
            return f"{self.root} is not a directory"
        return None if os.access(self.root, os.W_OK | os.X_OK) else f"{self.root} is not writable"
