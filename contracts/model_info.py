"""What a base model directory says about itself, read without torch: its config and its module names.

Used by the API at job creation (``lora.target_modules`` must name modules the model has, and
``max_length`` must fit its positions) and by the worker when it resolves the training config, so both
give the same answer. Module names come from the safetensors headers (8-byte length + JSON), never from
loading weights; a model saved without safetensors falls back to the known names of its architecture.
"""

from __future__ import annotations

import json
import struct
from functools import lru_cache
from pathlib import Path
from typing import Any

MAX_HEADER_BYTES = 100 * 1024 * 1024
"""The safetensors format's own cap on a header."""

DECODER_LINEAR_NAMES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
"""Linear layers of Llama/Mistral-family decoders: the fallback when a model has no safetensors files."""


class ModelInfoError(ValueError):
    """The model directory cannot be read (missing or corrupt config or weights header)."""


def read_config(model_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelInfoError(f"{model_dir.name}: cannot read config.json ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelInfoError(f"{model_dir.name}: config.json is not a JSON object")
    return data


def _safetensors_header(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ModelInfoError(f"{path.name}: truncated safetensors header")
            (size,) = struct.unpack("<Q", raw)
            if size > MAX_HEADER_BYTES:
                raise ModelInfoError(f"{path.name}: safetensors header of {size} bytes is over the format's limit")
            header = json.loads(f.read(size))
    except OSError as exc:
        raise ModelInfoError(f"{path.name}: {exc}") from exc
    except ValueError as exc:
        raise ModelInfoError(f"{path.name}: corrupt safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise ModelInfoError(f"{path.name}: corrupt safetensors header")
    return header


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelInfoError(f"{model_dir.name}: corrupt model.safetensors.index.json ({exc})") from exc
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    single = model_dir / "model.safetensors"
    return [single] if single.is_file() else []


def _linear_modules_from_weights(model_dir: Path) -> frozenset[str] | None:
    files = _weight_files(model_dir)
    if not files:
        return None
    modules = set()
    for path in files:
        for name, meta in _safetensors_header(path).items():
            if name == "__metadata__" or not name.endswith(".weight") or not isinstance(meta, dict):
                continue
            if len(meta.get("shape") or ()) == 2:  # Linear (and embedding) weights; norms are 1-D
                modules.add(name.removesuffix(".weight"))
    return frozenset(modules)


@lru_cache(maxsize=64)
def _cached_modules(model_dir: Path, _stamp: float) -> frozenset[str] | None:
    return _linear_modules_from_weights(model_dir)


def weight_module_paths(model_dir: Path) -> frozenset[str] | None:
    """Dotted paths of the model's 2-D weight modules (``model.layers.0.self_attn.q_proj``...), or None
    when the directory has no safetensors weights to read them from. Cached per directory and mtime."""
    try:
        stamp = max(p.stat().st_mtime for p in [model_dir / "config.json", *_weight_files(model_dir)])
    except OSError as exc:
        raise ModelInfoError(f"{model_dir.name}: {exc}") from exc
    return _cached_modules(model_dir, stamp)


def _matches(target: str, path: str) -> bool:
    """PEFT's rule for a string in ``target_modules``: the module path equals it or ends with ``.target``."""
    return path == target or path.endswith("." + target)


def unknown_target_modules(model_dir: Path, targets: list[str]) -> tuple[list[str], list[str]]:
    """(targets that match no module of the model, the short module names it does have, sorted).

    Embeddings and the output head are not offered as choices (LoRA on them is rarely meant), but a target
    naming them explicitly is accepted, as PEFT would accept it.
    """
    paths = weight_module_paths(model_dir)
    if paths is None:
        config = read_config(model_dir)
        known = set(DECODER_LINEAR_NAMES) if config.get("model_type") in _DECODERS else None
        if known is None:  # an architecture we cannot check without its weights: leave it to PEFT
            return [], []
        return [t for t in targets if t.rsplit(".", 1)[-1] not in known], sorted(known)
    unknown = [t for t in targets if not any(_matches(t, p) for p in paths)]
    choices = sorted({p.rsplit(".", 1)[-1] for p in paths} - {"embed_tokens", "lm_head", "wte", "wpe"})
    return unknown, choices


_DECODERS = frozenset({"mistral", "llama", "qwen2", "qwen3", "mixtral", "gemma", "gemma2", "gemma3_text"})


def max_positions(model_dir: Path) -> int | None:
    value = read_config(model_dir).get("max_position_embeddings")
    return int(value) if isinstance(value, int) and value > 0 else None


CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
"""Where ``save_pretrained`` (transformers >= 4.43) keeps a tokenizer's chat template besides
``tokenizer_config.json``'s ``chat_template`` key."""


def parameter_count(model_dir: Path) -> int | None:
    """Number of stored weights (elements of every tensor in the safetensors files), or None without them.

    Read from the headers only. Tied weights are stored once, so this is what ``model.num_parameters()``
    reports for a model with ``tie_word_embeddings`` (134,515,008 for SmolLM2-135M).
    Raises ModelInfoError on a corrupt header.
    """
    files = _weight_files(model_dir)
    if not files:
        return None
    total = 0
    for path in files:
        for name, meta in _safetensors_header(path).items():
            if name == "__metadata__" or not isinstance(meta, dict):
                continue
            count = 1
            for dim in meta.get("shape") or ():
                count *= int(dim)
            total += count
    return total


def has_chat_template(model_dir: Path) -> bool:
    """True when the tokenizer saved in ``model_dir`` carries a chat template: the same reading jobs use
    (``contracts.chat_templates.model_chat_template``), so a model listed without one is exactly a model
    whose jobs get the default template."""
    from contracts.chat_templates import model_chat_template

    try:
        return model_chat_template(model_dir) is not None
    except (OSError, ValueError):
        return False


def architecture(config: dict[str, Any]) -> str | None:
    """The model class ``config.json`` names (``LlamaForCausalLM``), or its ``model_type`` without one."""
    names = config.get("architectures")
    if isinstance(names, list) and names and isinstance(names[0], str):
        return names[0]
    model_type = config.get("model_type")
    return model_type if isinstance(model_type, str) else None


def context_length(config: dict[str, Any]) -> int | None:
    """Longest sequence the model was built for, in tokens (``max_position_embeddings``, or GPT-2's ``n_positions``)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def describe_model(model_dir: Path) -> dict[str, Any]:
    """What ``ipo models list`` and ``GET /v1/models`` say about a base model, read without torch.

    Returns ``{"architecture": str | None, "parameters": int | None, "context_length": int | None,
    "chat_template": bool}``; ``parameters`` is None when the weights are not safetensors. Cached per
    directory and modification time of its config and weights. Raises ModelInfoError when the config or a
    weights header cannot be read.
    """
    try:
        stamp = max(p.stat().st_mtime for p in [model_dir / "config.json", *_weight_files(model_dir)])
        template_stamp = max(
            (
                p.stat().st_mtime
                for p in [model_dir / "tokenizer_config.json", *(model_dir / n for n in CHAT_TEMPLATE_FILES)]
                if p.exists()
            ),
            default=0.0,
        )
    except OSError as exc:
        raise ModelInfoError(f"{model_dir.name}: {exc}") from exc
    return dict(_cached_description(model_dir, stamp, template_stamp))


@lru_cache(maxsize=64)
def _cached_description(model_dir: Path, _stamp: float, _template_stamp: float) -> tuple[tuple[str, Any], ...]:
    config = read_config(model_dir)
    return (
        ("architecture", architecture(config)),
        ("parameters", parameter_count(model_dir)),
        ("context_length", context_length(config)),
        ("chat_template", has_chat_template(model_dir)),
    )
