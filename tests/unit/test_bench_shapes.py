"""bench/model_shapes.py and the mistral-7b shape of bench/train_throughput.py: dimensions, shrinking, the
built model directory, the "long" data and the MFU arithmetic (no training, no timing)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from bench import model_shapes
from bench.train_throughput import HP_7B, LONG_ROWS, check_shape_args, count_tokens, row_length, write_long_data


def _heads_consistent(dims: dict[str, int]) -> None:
    assert dims["num_attention_heads"] * model_shapes.HEAD_DIM == dims["hidden_size"]
    assert dims["num_key_value_heads"] >= 1
    assert dims["num_attention_heads"] % dims["num_key_value_heads"] == 0


def test_full_shape_is_mistral_7b_v0_1() -> None:
    config = model_shapes.mistral_config()
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (4096, 14336, 32)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (32, 8, 128)
    assert (config.vocab_size, config.max_position_embeddings, config.sliding_window) == (32000, 32768, 4096)
    rope = getattr(config, "rope_parameters", None) or {"rope_theta": config.rope_theta}
    assert rope["rope_theta"] == 10000.0
    assert config.tie_word_embeddings is False
    _heads_consistent(model_shapes.shape_dims())
    assert model_shapes.param_count(config) == model_shapes.N_PARAMS_MISTRAL_7B
    assert model_shapes.shape_label("mistral-7b") == "mistral-7b"
    assert model_shapes.shape_label("mistral-7b", 32, 4096) == "mistral-7b"  # the full values are not a shrink


@pytest.mark.parametrize(("layers", "hidden"), [(1, 128), (1, 256), (2, 512), (4, 1024), (None, 2048), (3, None)])
def test_shrunk_shapes_keep_head_dim_and_gqa(layers: int | None, hidden: int | None) -> None:
    dims = model_shapes.shape_dims(layers, hidden)
    _heads_consistent(dims)
    assert dims["num_key_value_heads"] == max(1, dims["num_attention_heads"] // 4)
    assert dims["intermediate_size"] == dims["hidden_size"] * 7 // 2
    assert model_shapes.is_shrunk(layers, hidden)
    label = model_shapes.shape_label("mistral-7b", layers, hidden)
    assert "SHRUNK" in label and "not 7B" in label


@pytest.mark.parametrize("hidden", [64, 200, 1000])
def test_hidden_size_must_be_whole_heads(hidden: int) -> None:
    with pytest.raises(ValueError, match="multiple of 128"):
        model_shapes.shape_dims(1, hidden)


def test_built_shrunk_model_dir_and_long_data(tmp_path: Path) -> None:
    model = model_shapes.build_model_dir(tmp_path / "model", layers=1, hidden_size=256, device="cpu")
    config = json.loads((model / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (256, 1, 32000)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (2, 1, 128)
    assert config["dtype"] == "bfloat16"
    assert list(model.glob("*.safetensors"))

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    assert tok.chat_template and len(tok) < config["vocab_size"]
    assert tok.model_max_length >= HP_7B["max_length"]

    n_rows = 24
    data, lengths = write_long_data(tmp_path / "long", model, n_rows)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert len(rows) == len(lengths) == n_rows
    assert [row_length(tok, r) for r in rows] == lengths
    lo, hi = LONG_ROWS
    assert all(lo <= n <= hi <= HP_7B["max_length"] for n in lengths), lengths
    assert max(lengths) - min(lengths) > (hi - lo) // 3  # variable lengths, not one padded size
    tokens, truncated, longest = count_tokens(model, data, n_rows, HP_7B["max_length"])
    assert truncated == 0 and longest == max(lengths) and tokens > n_rows * lo


def test_peak_table_and_mfu() -> None:
    peak = model_shapes.peak_bf16_flops
    assert peak("NVIDIA H100 80GB HBM3") == 989e12
    assert peak("NVIDIA H100 PCIe") == 756e12
    assert peak("NVIDIA H200") == 989e12
    assert peak("NVIDIA A100-SXM4-80GB") == peak("NVIDIA A100-PCIE-40GB") == 312e12
    assert peak("NVIDIA L40S") == 362e12
    assert peak("NVIDIA H100 NVL") is None
    assert peak("Tesla T4") is None and peak(None) is None
    n = model_shapes.N_PARAMS_MISTRAL_7B
    assert model_shapes.mfu(n, 5000.0, "NVIDIA H100 80GB HBM3") == pytest.approx(6 * n * 5000.0 / 989e12)
    assert model_shapes.mfu(n, 5000.0, "NVIDIA H100 80GB HBM3") == pytest.approx(0.2197, abs=1e-4)
    assert model_shapes.mfu(n, 5000.0, "Tesla T4") is None


def _args(**kw: object) -> argparse.Namespace:
    base = {"device": "cpu", "layers": None, "hidden_size": None, "batch_size": None, "grad_accum": 1}
    return argparse.Namespace(**{**base, "max_steps": 20, "model_cache": None, **kw})


def test_full_7b_on_cpu_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        check_shape_args(argparse.ArgumentParser(prog="train_throughput"), _args())
    assert "not a benchmark" in capsys.readouterr().err
    a = _args(layers=1, hidden_size=256)
    check_shape_args(argparse.ArgumentParser(), a)  # shrunk: the smoke test of the code path
    assert a.batch_size == HP_7B["batch_size"] and a.model_cache
