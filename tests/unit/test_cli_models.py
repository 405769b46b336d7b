"""``ipo models import|list`` through the CLI's entry point: a checked checkpoint becomes an allow-listed
base model that ``GET /v1/models`` describes; each kind of bad checkpoint is refused with a one-line reason,
exit status 2, and nothing added to the models directory."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from ipo_cli.main import main
from tests.api.test_model_fit import write_model


def ipo(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, models: Path, *args: str | Path
) -> tuple[int, str, str]:
    """Run ``ipo ARGS`` in this process; returns (exit status, stdout, stderr)."""
    monkeypatch.setenv("IPO_MODELS_DIR", str(models))
    monkeypatch.setattr(sys, "argv", ["ipo", *map(str, args)])
    capsys.readouterr()
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "src" / "char-model"
    write_model(path, positions=96)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"]}))
    tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
    tokenizer_config["eos_token"] = tokenizer_config["eos_token"]["content"]  # the form transformers 5 loads
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return path


def test_import_a_directory_then_list_it(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    models = tmp_path / "models"
    (source / "README.md").write_text("card")
    code, out, err = ipo(capsys, monkeypatch, models, "models", "import", source, "--name", "my-model")
    assert code == 0, err
    assert "imported my-model" in out and "MistralForCausalLM" in out and "chat template" in out
    imported = models / "my-model"
    assert sorted(p.name for p in imported.iterdir()) == sorted(
        [*(p.name for p in source.iterdir()), "ipo_source.json"]
    )
    assert json.loads((imported / "ipo_source.json").read_text())["path"] == str(source.resolve())
    assert not [p for p in models.iterdir() if p.name.startswith(".")]  # no staging folder left behind

    code, out, _ = ipo(capsys, monkeypatch, models, "models", "list", "--json")
    # 8x4 embedding + 8x4 head + 7 4x4 projections + a 4-element norm (tests/api/test_model_fit.py)
    assert json.loads(out) == [
        {
            "id": "my-model",
            "architecture": "MistralForCausalLM",
            "parameters": 8 * 4 * 2 + 7 * 16 + 4,
            "context_length": 96,
            "chat_template": True,
        }
    ]
    code, out, _ = ipo(capsys, monkeypatch, models, "models", "list")
    assert out.strip() == "my-model  MistralForCausalLM  0.0M params  context 96  chat template: yes"

    code, _, err = ipo(capsys, monkeypatch, models, "models", "import", source, "--name", "my-model")
    assert code == 2 and "already exists" in err and "--force" in err
    code, _, err = ipo(capsys, monkeypatch, models, "models", "import", source, "--name", "my-model", "--force")
    assert code == 0, err


def _break_pickle(path: Path) -> None:
    (path / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")


def _break_only_pickle(path: Path) -> None:
    (path / "model.safetensors").rename(path / "pytorch_model.bin")


def _break_no_weights(path: Path) -> None:
    (path / "model.safetensors").unlink()


def _break_no_config(path: Path) -> None:
    (path / "config.json").unlink()


def _break_config_json(path: Path) -> None:
    (path / "config.json").write_text("{not json")


def _break_remote_code(path: Path) -> None:
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (path / "config.json").write_text(json.dumps(config))


def _break_remote_tokenizer(path: Path) -> None:
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_custom.CustomTokenizer", None]}
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def _break_unknown_type(path: Path) -> None:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "my-own-arch"}))


def _break_not_causal(path: Path) -> None:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "vit", "architectures": ["ViTModel"]}))


def _break_wrong_class(path: Path) -> None:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCustomThing"]}))


def _break_no_tokenizer(path: Path) -> None:
    (path / "tokenizer.json").unlink()


def _break_tokenizer_file(path: Path) -> None:
    (path / "tokenizer.json").write_text('{"not": "a tokenizer"}')


def _break_weights_header(path: Path) -> None:
    (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")


REFUSALS = [
    (_break_pickle, "pytorch_model.bin: pickle weights can run code when loaded; only safetensors are accepted"),
    (_break_only_pickle, "pytorch_model.bin: pickle weights"),
    (_break_no_weights, "no model.safetensors or model.safetensors.index.json"),
    (_break_no_config, "no config.json (not a Hugging Face model directory)"),
    (_break_config_json, "cannot read config.json"),
    (_break_remote_code, "config.json has an auto_map: the model needs trust_remote_code"),
    (_break_remote_tokenizer, "tokenizer_config.json has an auto_map: the model needs trust_remote_code"),
    (_break_unknown_type, "model_type 'my-own-arch' is not an architecture transformers knows"),
    (_break_not_causal, "model_type 'vit' has no causal language model class in transformers"),
    (_break_wrong_class, "architecture 'MistralForCustomThing' is not transformers' causal LM class for 'mistral'"),
    (_break_no_tokenizer, "no tokenizer (expected tokenizer.json, tokenizer.model or vocab.json + merges.txt)"),
    (_break_tokenizer_file, "tokenizer: transformers cannot load it"),
    (_break_weights_header, "model.safetensors: corrupt safetensors header"),
]


@pytest.mark.parametrize(("breaker", "reason"), REFUSALS, ids=[b.__name__.removeprefix("_break_") for b, _ in REFUSALS])
def test_a_bad_checkpoint_is_refused_with_its_reason(
    breaker: Callable[[Path], None],
    reason: str,
    source: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    breaker(source)
    models = tmp_path / "models"
    code, out, err = ipo(capsys, monkeypatch, models, "models", "import", source)
    assert code == 2, (out, err)
    assert reason in err, err
    assert err.startswith("ipo: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not models.exists() or not list(models.iterdir())


def test_paths_and_names_that_are_not_models(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    models = tmp_path / "models"
    cases = [
        ((tmp_path / "nowhere",), "no such file or directory"),
        ((source / "config.json",), "config.json: expected a model directory or a .gguf file"),
        ((source, "--name", "../escape"), "invalid model name '../escape'"),
        ((source, "--name", ".hidden"), "invalid model name '.hidden'"),
    ]
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not gguf")
    cases.append(((fake,), "fake.gguf: not a GGUF file"))
    for args, reason in cases:
        code, _, err = ipo(capsys, monkeypatch, models, "models", "import", *args)
        assert code == 2 and reason in err and err.count("\n") == 1, (args, err)
    assert not models.exists() or not list(models.iterdir())
    code, _, err = ipo(capsys, monkeypatch, models, "models", "fetch", "gpt-5")
    assert code == 2 and "unknown model 'gpt-5': ipo models fetch knows smollm2-135m-instruct" in err


def test_demo_names_the_models_it_knows(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    code, _, err = ipo(capsys, monkeypatch, tmp_path / "models", "demo", "--model", "gpt-5")
    assert code == 2, err
    assert "no demo for 'gpt-5': ipo demo knows tiny-mistral (default), smollm2-135m-instruct" in err
