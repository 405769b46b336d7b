from __future__ import annotations

import os
import stat
import zipfile
from pathlib import Path

import pytest

from worker.archive import UnsafeArchive, unzip_safe, zip_dir


def test_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "adapter"
    (src / "sub").mkdir(parents=True)
    (src / "adapter_config.json").write_text('{"r": 16}')
    (src / "sub" / "weights.bin").write_bytes(os.urandom(4096))
    (src / "empty").mkdir()
    archive = zip_dir(src, tmp_path / "out" / "adapter.zip")
    with zipfile.ZipFile(archive) as zf:
        assert sorted(zf.namelist()) == ["adapter_config.json", "empty/", "sub/", "sub/weights.bin"]
    dest = unzip_safe(archive, tmp_path / "restored")
    assert (dest / "adapter_config.json").read_text() == '{"r": 16}'
    assert (dest / "sub" / "weights.bin").read_bytes() == (src / "sub" / "weights.bin").read_bytes()
    assert (dest / "empty").is_dir()
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_zip_dir_skips_symlinks(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (tmp_path / "secret").write_text("x")
    (src / "link").symlink_to(tmp_path / "secret")
    (src / "real").write_text("y")
    with zipfile.ZipFile(zip_dir(src, tmp_path / "a.zip")) as zf:
        assert zf.namelist() == ["real"]


@pytest.mark.parametrize(
    "name", ["../evil.txt", "ok/../../evil.txt", "/etc/evil", "\\evil", "C:/evil", "a\\..\\..\\evil"]
)
def test_zip_slip_refused(tmp_path: Path, name: str) -> None:
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("fine.txt", "ok")
        zf.writestr(name, "pwned")
    with pytest.raises(UnsafeArchive):
        unzip_safe(archive, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
    assert not (tmp_path / "evil.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.zip"]  # staging cleaned up


def test_symlink_entry_refused(tmp_path: Path) -> None:
    archive = tmp_path / "link.zip"
    info = zipfile.ZipInfo("link")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(UnsafeArchive):
        unzip_safe(archive, tmp_path / "dest")


def test_not_a_zip(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.zip"
    bogus.write_bytes(b"not a zip")
    with pytest.raises(UnsafeArchive):
        unzip_safe(bogus, tmp_path / "dest")
