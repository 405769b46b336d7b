"""The README's openai SDK example, executed verbatim against a live server and a real worker."""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

import pytest

from tests.e2e.conftest import Stack
from worker.training.demo_data import write_demo_data

pytestmark = pytest.mark.e2e


def readme_python_block(repo_root: Path) -> str:
    text = (repo_root / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    (block,) = [b for b in blocks if "OpenAI(base_url" in b]
    return block


def test_readme_sdk_example_runs(stack: Stack, repo_root: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    write_demo_data(tmp_path / "var" / "data", n_train=32, n_valid=8, seed=5)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IPO_BASE_URL", stack.url)
    monkeypatch.setenv("IPO_API_KEY", stack.api_key)
    exec(compile(readme_python_block(repo_root), "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "succeeded ft:tiny-mistral:" in out, out
    assert "The job has successfully completed" in out
    assert len(re.findall(r"^(?:info|warn|error) ", out, flags=re.M)) == 5  # the newest 5 events, not all
    names = zipfile.ZipFile(tmp_path / "adapter.zip").namelist()
    assert "adapter_model.safetensors" in names and "adapter_config.json" in names
    assert os.environ["IPO_API_KEY"] == stack.api_key
