"""Model shapes for bench/train_throughput.py: the tiny demo model, or a Mistral-7B-shaped one built locally.

``mistral-7b`` is ``MistralConfig`` with Mistral-7B-v0.1's dimensions (hidden 4096, MLP 14336, 32 layers,
32 query heads and 8 KV heads of 128, vocab 32000, rope theta 10000, 32768 positions, sliding window
4096) and random weights: nothing is downloaded. It is built once into a cache directory (bf16, on CUDA
when there is one, so the random init takes seconds), saved with ``save_pretrained`` (safetensors,
2 GB shards), with the tiny model's tokenizer and chat template (worker/training/tiny.py; its ids are
< 512, so they index the bigger embedding). Random weights train at the speed of real ones: the
benchmark measures throughput and memory, not learning.

``--layers``/``--hidden-size`` shrink it for CPU smoke tests (head_dim stays 128: heads = hidden/128,
KV heads = heads/4, at least 1; MLP = 3.5 x hidden as in 7B); the shape's label then says so.

MFU here is the conventional ``6 x N_params x tokens/s / peak dense bf16 FLOP/s`` (N_params of the
base model, every token counted once: 2N forward + 4N backward per token). LoRA on a frozen base
skips the weight gradients (~2N of the 4N backward), gradient checkpointing adds a forward, and the
IPO reference pass adds another, so this is a yardstick to compare runs, not the GPU's true
utilisation.

    python -m bench.model_shapes --out DIR [--layers N] [--hidden-size N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

SHAPES = ("tiny", "mistral-7b")

# Mistral-7B-v0.1's config.json (mistralai/Mistral-7B-v0.1), the fields that set the shape and the work.
MISTRAL_7B: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "rope_theta": 10000.0,
    "max_position_embeddings": 32768,
    "sliding_window": 4096,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
HEAD_DIM = 128
N_PARAMS_MISTRAL_7B = 7_241_732_096  # Mistral-7B-v0.1's parameter count (the unit test checks the config gives it)

# Peak dense (no sparsity) bf16 tensor FLOP/s by GPU name (NVIDIA datasheets). Matched in order against
# the upper-cased ``torch.cuda.get_device_name()``: every substring of an entry must occur. ``None``:
# a variant with another peak (NVL boards) that the table does not know. Unknown GPU -> MFU "n/a".
PEAK_BF16_FLOPS: tuple[tuple[tuple[str, ...], float | None], ...] = (
    (("NVL",), None),
    (("H100", "PCIE"), 756e12),
    (("H100", "HBM3"), 989e12),  # H100 SXM5 reports itself as "NVIDIA H100 80GB HBM3"
    (("H100", "SXM"), 989e12),
    (("H200",), 989e12),
    (("A100",), 312e12),
    (("L40S",), 362e12),
)


def peak_bf16_flops(device_name: str | None) -> float | None:
    """Peak dense bf16 FLOP/s of a GPU named ``device_name``, or None when the table does not know it."""
    if not device_name:
        return None
    name = device_name.upper()
    for needles, flops in PEAK_BF16_FLOPS:
        if all(n in name for n in needles):
            return flops
    return None


def mfu(n_params: int, tokens_per_second: float, device_name: str | None) -> float | None:
    """Model FLOPs utilisation, 6N convention (see the module docstring); None for an unknown GPU."""
    peak = peak_bf16_flops(device_name)
    if peak is None:
        return None
    return 6.0 * n_params * tokens_per_second / peak


# ---------------------------------------------------------------------------------------------- shapes


def shape_dims(layers: int | None = None, hidden_size: int | None = None) -> dict[str, Any]:
    """Mistral-7B's dimensions, optionally shrunk (heads follow the hidden size at head_dim 128)."""
    dims = dict(MISTRAL_7B)
    if layers is not None:
        if layers < 1:
            raise ValueError(f"--layers must be >= 1, got {layers}")
        dims["num_hidden_layers"] = layers
    if hidden_size is not None:
        if hidden_size < HEAD_DIM or hidden_size % HEAD_DIM:
            raise ValueError(f"--hidden-size must be a multiple of {HEAD_DIM} (the head dim), got {hidden_size}")
        heads = hidden_size // HEAD_DIM
        dims.update(
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 7 // 2,  # 14336 / 4096 = 3.5
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 4),  # 32 / 8 in 7B
        )
    return dims


def is_shrunk(layers: int | None, hidden_size: int | None) -> bool:
    dims = shape_dims(layers, hidden_size)
    return any(dims[k] != MISTRAL_7B[k] for k in ("num_hidden_layers", "hidden_size"))


def shape_label(shape: str, layers: int | None = None, hidden_size: int | None = None) -> str:
    if shape == "tiny" or not is_shrunk(layers, hidden_size):
        return shape
    dims = shape_dims(layers, hidden_size)
    return (
        f"{shape} SHRUNK to {dims['num_hidden_layers']} layer(s), hidden {dims['hidden_size']} "
        f"({dims['num_attention_heads']} heads / {dims['num_key_value_heads']} KV): a smoke test, not 7B"
    )


def mistral_config(layers: int | None = None, hidden_size: int | None = None, **token_ids: Any) -> Any:
    """``MistralConfig`` of the (optionally shrunk) 7B shape; ``token_ids``: pad/bos/eos_token_id."""
    from transformers import MistralConfig

    # rope_theta: transformers 5 files it under rope_parameters={"rope_type": "default", "rope_theta": ...}
    return MistralConfig(**shape_dims(layers, hidden_size), **token_ids)


def param_count(config: Any) -> int:
    """Parameters of ``MistralForCausalLM(config)``, counted on the meta device (no memory, no init)."""
    import torch
    from transformers import MistralForCausalLM

    with torch.device("meta"):
        model = MistralForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------- building


def _tokenizer() -> Any:
    from worker.training import demo_data, tiny

    return tiny.build_tokenizer(demo_data.pretraining_corpus(0))


def build_model_dir(out: Path, layers: int | None = None, hidden_size: int | None = None, device: str = "cpu") -> Path:
    """Random-init the shape in bf16 on ``device`` and save it (2 GB safetensors shards) with the tokenizer."""
    import torch
    from transformers import MistralForCausalLM

    tokenizer = _tokenizer()
    config = mistral_config(
        layers,
        hidden_size,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} ids, the shape's vocab only {config.vocab_size}")
    tokenizer.model_max_length = config.max_position_embeddings  # the tiny tokenizer says 512
    torch.manual_seed(0)
    with torch.device(device):
        model = MistralForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size="2GB")  # safetensors shards + model.safetensors.index.json
    tokenizer.save_pretrained(out)
    return out


def model_dir(cache: Path, layers: int | None, hidden_size: int | None, device: str) -> Path:
    """The shape's model directory under ``cache``, built (in a child process, so this one keeps no
    CUDA context and no weights) when it is not there yet. Keyed by the dimensions and the tokenizer code."""
    from worker.training import demo_data, tiny

    dims = shape_dims(layers, hidden_size)
    digest = hashlib.sha256(
        json.dumps(dims, sort_keys=True).encode()
        + Path(tiny.__file__).read_bytes()
        + Path(demo_data.__file__).read_bytes()
        + Path(__file__).read_bytes()
    ).hexdigest()[:12]
    name = f"mistral-7b-L{dims['num_hidden_layers']}-H{dims['hidden_size']}-{digest}"
    out = cache / name
    if (out / "config.json").exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="building-", dir=cache))
    cmd = [sys.executable, "-m", "bench.model_shapes", "--out", str(staging / name), "--device", device]
    if layers is not None:
        cmd += ["--layers", str(layers)]
    if hidden_size is not None:
        cmd += ["--hidden-size", str(hidden_size)]
    print(f"building {name} on {device} into {out} ...", flush=True)
    try:
        subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parent.parent)
        try:
            (staging / name).rename(out)
        except OSError:  # another run finished first
            if not (out / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def default_cache() -> Path:
    return Path(os.environ.get("BENCH_MODEL_CACHE") or Path(tempfile.gettempdir()) / "ipo-bench-models")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Build the Mistral-7B-shaped random-weight model directory.")
    p.add_argument("--out", required=True)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--hidden-size", type=int, default=None)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    a = p.parse_args(argv)
    out = build_model_dir(Path(a.out), a.layers, a.hidden_size, a.device)
    print(f"built {out}")


if __name__ == "__main__":
    main()
