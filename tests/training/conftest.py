"""Training fixtures: the tiny model (built once, see tests/conftest.py) and the demo data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_models_dir: Path) -> Path:
    return tiny_models_dir / "tiny-mistral"


@pytest.fixture(scope="session")
def demo_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from worker.training.demo_data import write_demo_data

    return write_demo_data(tmp_path_factory.mktemp("data"), seed=0)
