"""``ipo data validate FILE --model M --max-length N`` through the real entry point: the validator's
verdict plus token lengths counted with the model's tokenizer and chat template, and what would be cut."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.api.test_model_fit import line, prompt_tokens, write_model

REPO = Path(__file__).resolve().parents[2]


def ipo(*args: str | Path, models: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "IPO_MODELS_DIR": str(models), "HOME": str(models)}
    return subprocess.run(
        [sys.executable, "-m", "ipo_cli.main", *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True
    )


def test_token_lengths_and_truncation_for_a_model(tmp_path: Path) -> None:
    write_model(tmp_path / "models" / "char-model")
    data = tmp_path / "train.jsonl"
    data.write_bytes(line("ab") + line("a" * 20) + line("abc") + line("a" * 40))
    limit = prompt_tokens("a" * 20) + 2  # line 2 fits with its reply cut; line 4's prompt fills it
    r = ipo(
        "data",
        "validate",
        data,
        "--model",
        "char-model",
        "--max-length",
        str(limit),
        "--json",
        models=tmp_path / "models",
    )
    assert r.returncode == 2, r.stderr  # a prompt that fills max_length would make the job refused
    out = json.loads(r.stdout)
    assert out["ok"] is True and out["n_examples"] == 4
    tokens = out["tokens"]
    assert tokens["prompt_tokens"]["max"] == prompt_tokens("a" * 40)
    assert tokens["prompt_tokens"]["min"] == prompt_tokens("ab")
    assert (tokens["truncated_lines"], tokens["unusable_lines"]) == ([2], [4])

    human = ipo("data", "validate", data, "--model", tmp_path / "models" / "char-model", models=tmp_path / "x")
    assert human.returncode == 0, human.stderr
    assert "train.jsonl is valid: 4 examples" in human.stdout and "prompt + reply:" in human.stdout


def test_bad_usage_is_one_line_on_stderr(tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_bytes(line("ab"))
    r = ipo("data", "validate", data, "--max-length", "8", models=tmp_path)
    assert r.returncode == 2 and "--max-length needs --model" in r.stderr and "Traceback" not in r.stderr
    r = ipo("data", "validate", data, "--model", "nope", models=tmp_path)
    assert r.returncode == 2 and "no tokenizer for model 'nope'" in r.stderr and "Traceback" not in r.stderr


def test_a_template_refusal_names_the_lines_without_a_traceback(tmp_path: Path) -> None:
    from tests.api.test_data_faults_api import PLAIN_ROW, REFUSING_TEMPLATE, SYSTEM_ROW, jsonl, set_template

    model = tmp_path / "models" / "gemma-like"
    write_model(model)
    set_template(model, REFUSING_TEMPLATE)
    data = tmp_path / "train.jsonl"
    data.write_bytes(jsonl(PLAIN_ROW, SYSTEM_ROW))
    r = ipo("data", "validate", data, "--model", "gemma-like", models=tmp_path / "models")
    assert r.returncode == 2 and "Traceback" not in r.stderr + r.stdout, r.stderr
    assert "refuses 1 example(s)" in r.stdout and "line 2: System role not supported" in r.stdout
    out = json.loads(ipo("data", "validate", data, "--model", model, "--json", models=tmp_path).stdout)
    assert out["tokens"]["template_refusal_lines"] == [{"line": 2, "message": "System role not supported"}]


def test_text_rows_with_markup_are_said_to_be_used_verbatim(tmp_path: Path) -> None:
    write_model(tmp_path / "models" / "char-model")
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "<|user|>\nab</s>\n<|assistant|>\n", "chosen": "a", "rejected": "b"}) + "\n")
    r = ipo("data", "validate", data, "--model", "char-model", models=tmp_path / "models")
    assert r.returncode == 0, r.stderr
    assert "used verbatim" in r.stdout and "Zephyr" in r.stdout


def test_a_base_model_is_measured_with_the_default_template(tmp_path: Path) -> None:
    from tests.unit.test_chat_templates import base_model

    base_model(tmp_path / "models" / "base")
    data = tmp_path / "train.jsonl"
    data.write_bytes(line("ab"))
    r = ipo("data", "validate", data, "--model", "base", models=tmp_path / "models")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "chat template: model 'base' has no chat template (a base model)" in r.stdout and "zephyr" in r.stdout
    named = ipo(
        "data", "validate", data, "--model", "base", "--chat-template", "chatml", "--json", models=tmp_path / "models"
    )
    assert json.loads(named.stdout)["tokens"]["chat_template"] == "chatml"
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    custom = ipo(
        "data", "validate", data, "--model", "base", "--chat-template", template, "--json", models=tmp_path / "models"
    )
    tokens = json.loads(custom.stdout)["tokens"]
    assert tokens["chat_template"] == "custom" and tokens["prompt_tokens"]["max"] == 2  # "ab", nothing else
    bad = ipo("data", "validate", data, "--model", "base", "--chat-template", "vicuna", models=tmp_path / "models")
    assert bad.returncode == 2 and "neither a named template" in bad.stderr and "Traceback" not in bad.stderr


def test_a_file_invalid_only_with_the_models_special_tokens_fails(tmp_path: Path) -> None:
    write_model(tmp_path / "models" / "char-model")
    data = tmp_path / "train.jsonl"
    rows = [
        {"prompt": "<s>ab", "chosen": "a", "rejected": "b"},  # "<s>" is this model's special token: verbatim
        {"system": "be brief", "prompt": "ab", "chosen": "a", "rejected": "b"},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = ipo("data", "validate", data, "--model", "char-model", models=tmp_path / "models")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "with the special tokens of char-model" in r.stdout and "line 1: this text row carries" in r.stdout
