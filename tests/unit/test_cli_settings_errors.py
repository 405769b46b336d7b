"""A setting from the environment that does not validate is one line naming the variable, not a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize(
    ("variable", "value", "reason"),
    [
        ("IPO_STORAGE_PRESIGN_SECONDS", "604801", "Input should be less than or equal to 604800"),
        ("IPO_STORAGE_PUBLIC_ENDPOINT_URL", "localhost:9100", "must be an http:// or https:// URL"),
        ("IPO_LEASE_SECONDS", "soon", "Input should be a valid integer"),
    ],
)
def test_a_bad_setting_is_one_line(variable: str, value: str, reason: str, tmp_path: Path) -> None:
    env = {**os.environ, "IPO_VAR_DIR": str(tmp_path / "var"), variable: value}
    out = subprocess.run(
        [sys.executable, "-m", "ipo_cli.main", "serve", "--port", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith(f"ipo: error: invalid setting {variable}={value}: ") and reason in line, line
