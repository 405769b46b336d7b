"""The allow-list of base models: every directory under ``IPO_MODELS_DIR`` holding a ``config.json``.

Only these names are accepted as a job's ``model``; the worker loads the same directory by name, so
no hub id, remote code or arbitrary path can ever be requested through the API.
"""

from __future__ import annotations

import re
from pathlib import Path

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def list_base_models(models_dir: Path) -> list[str]:
    if not models_dir.is_dir():
        return []
    return sorted(p.name for p in models_dir.iterdir() if (p / "config.json").is_file() and _NAME.match(p.name))


def is_allowed(models_dir: Path, name: str) -> bool:
    return bool(_NAME.match(name)) and (models_dir / name / "config.json").is_file()


def base_model_created(models_dir: Path, name: str) -> int:
    """``created`` of a base model: when its ``config.json`` was written (seconds since the epoch)."""
    try:
        return int((models_dir / name / "config.json").stat().st_mtime)
    except OSError:
        return 0
