"""Zip a directory for upload, and unzip a downloaded one without letting it write outside its target.

Checkpoints and adapters travel as zips of a directory's *contents* (entries relative to the
directory). Unzipping refuses absolute paths, ``..`` components, drive letters and symlinks
(zip-slip), and extracts into a temporary sibling first so a failed extraction leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath


class UnsafeArchive(ValueError):
    """The zip has an entry that would land outside the target directory, or is not a zip at all."""


def zip_dir(src: Path, dest: Path) -> Path:
    """Write ``dest`` (a zip of everything under ``src``, paths relative to ``src``); atomic on success."""
    src = Path(src)
    dest = Path(dest)
    if not src.is_dir():
        raise NotADirectoryError(str(src))
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        # Weights barely compress; deflate level 1 keeps big adapters/checkpoints fast to pack.
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            for path in sorted(src.rglob("*")):
                if path.is_symlink() or not (path.is_file() or path.is_dir()):
                    continue  # never follow links out of the directory
                arcname = path.relative_to(src).as_posix()
                if path.is_dir():
                    zf.write(path, arcname + "/")
                else:
                    zf.write(path, arcname)
        tmp.replace(dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def _safe_member_path(name: str) -> PurePosixPath:
    if not name or "\x00" in name:
        raise UnsafeArchive(f"invalid entry name {name!r}")
    if PureWindowsPath(name).drive or name.startswith(("/", "\\")):
        raise UnsafeArchive(f"absolute path in archive: {name!r}")
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if any(part == ".." for part in parts):
        raise UnsafeArchive(f"'..' in archive entry: {name!r}")
    return PurePosixPath(*[p for p in parts if p not in ("", ".")])


def unzip_safe(archive: Path, dest: Path) -> Path:
    """Extract ``archive`` into ``dest`` (created; must not exist yet). Raises :class:`UnsafeArchive`."""
    archive = Path(archive)
    dest = Path(dest)
    if dest.exists():
        raise FileExistsError(str(dest))
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        try:
            zf = zipfile.ZipFile(archive)
        except zipfile.BadZipFile as exc:
            raise UnsafeArchive(f"not a zip file: {archive.name}") from exc
        with zf:
            root = staging.resolve()
            for info in zf.infolist():
                rel = _safe_member_path(info.filename)
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    raise UnsafeArchive(f"symlink in archive: {info.filename!r}")
                target = (root / rel).resolve() if rel.parts else root
                if target != root and root not in target.parents:
                    raise UnsafeArchive(f"entry escapes the target directory: {info.filename!r}")
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as source, open(target, "wb") as out:
                    shutil.copyfileobj(source, out, 1024 * 1024)
        staging.rename(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest
