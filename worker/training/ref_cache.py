"""A cache of prepared preference data: TRL's tokenized pairs plus the reference log-probs of each pair.

Scoring every pair with the reference model is a forward pass over the whole dataset; a retry, a resume
or another job on the same file, model and settings gets exactly the same numbers, so they are kept in
``{cache_dir}/prepared/{key}.parquet`` (the worker's ``IPO_TRAINING_CACHE_DIR``) and reused.

The key (``prepared_key``) covers everything the rows depend on: the file's bytes, the tokenizer (its
files, chat template and special tokens), the model (config, and per weight file its size and the
SHA-256 of its first and last MiB: cheap for a 7B model, and a changed checkpoint changes them), the
settings that change the tokens or the numbers (max_length, truncation, quantization, dtype, device)
and the library versions. A write goes to a temporary file that is renamed into place, so a reader
sees a whole entry or none (two workers writing the same entry both write whole files; the last
rename wins); an entry that cannot be read, or that names another key, is deleted and rebuilt.
Nothing is evicted: the directory may be deleted at any time (the next job rebuilds what it needs).

``PreparedInputs`` is how ``run.py`` uses it: load before the trainer is built (a hit turns the
precomputed reference on and skips TRL's tokenizing), store what the trainer prepared after.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset
from datasets.table import InMemoryTable

from worker.training.recipe import TrainingConfig
from worker.training.reporter import Reporter
from worker.training.request import TrainRequest

log = logging.getLogger(__name__)

FORMAT = "ipo-align/prepared-pairs/v2"
"""v2: text rows with chat markup are used verbatim and pairs identical after truncation are left out."""
COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps")
_KEY_META = b"ipo_align_key"
_SAMPLE_BYTES = 1 << 20
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _weights_fingerprint(path: Path) -> str:
    """Size plus the first and last MiB of each weight file (a 7B model is ~14 GB: not hashed whole)."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    digest.update(str(size).encode())
    with path.open("rb") as f:
        digest.update(f.read(_SAMPLE_BYTES))
        if size > _SAMPLE_BYTES:
            f.seek(max(_SAMPLE_BYTES, size - _SAMPLE_BYTES))
            digest.update(f.read(_SAMPLE_BYTES))
    return digest.hexdigest()


def model_fingerprint(model_path: str | Path) -> dict[str, str]:
    """config.json, tokenizer files (hashed whole) and weight files (sampled) of a local model directory."""
    root = Path(model_path)
    parts: dict[str, str] = {}
    for item in sorted(root.iterdir()):
        if not item.is_file():
            continue
        if item.name == "config.json" or item.name in _TOKENIZER_FILES:
            parts[item.name] = file_sha256(item)
        elif item.name.endswith(_WEIGHT_SUFFIXES):
            parts[item.name] = _weights_fingerprint(item)
    return parts


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """What the trainer's tokenizer object renders with (run.py may change the pad token after loading)."""
    return {
        "class": type(tokenizer).__name__,
        "chat_template": tokenizer.chat_template,
        "special": {name: getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "pad_token")},
        "padding_side": getattr(tokenizer, "padding_side", None),
    }


def prepared_key(
    data_file: str | Path,
    *,
    model_path: str | Path,
    tokenizer: Any,
    settings: dict[str, Any],
) -> str:
    """Cache key of ``data_file`` prepared for this model and tokenizer under ``settings`` (hex SHA-256).

    ``settings``: whatever else changes the prepared rows (max_length, truncation mode, quantization,
    compute dtype, device).
    """
    import torch
    import transformers
    import trl

    record = {
        "format": FORMAT,
        "data": file_sha256(data_file),
        "model": model_fingerprint(model_path),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "settings": settings,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


STALE_TMP_SECONDS = 3600
"""A temp file this old is left from a writer that died: pruned."""


class PreparedCache:
    """``{root}/prepared/{key}.parquet`` entries; ``load`` answers None for a miss or an unreadable entry.

    Bounded: after each write the least recently used entries (a hit refreshes an entry's mtime) are
    deleted until the directory holds at most ``max_bytes``; the entry just written is always kept.
    """

    def __init__(self, root: str | Path, max_bytes: int | None = None) -> None:
        self.dir = Path(root) / "prepared"
        self.max_bytes = max_bytes

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.parquet"

    def load(self, key: str) -> Dataset | None:
        path = self.path(key)
        if not path.exists():
            return None
        try:
            table = pq.read_table(path)
            meta = table.schema.metadata or {}
            if meta.get(_KEY_META) != key.encode():
                raise ValueError("entry written for another key")
            missing = [c for c in COLUMNS if c not in table.column_names]
            if missing or table.num_rows == 0:
                raise ValueError(f"missing columns {missing}" if missing else "no rows")
            if any(table[c].null_count for c in COLUMNS):
                raise ValueError("null values")
        except Exception as exc:  # corrupt, truncated, foreign: drop it, the caller rebuilds it
            log.warning("prepared-data cache entry %s unusable (%s); rebuilding it", path.name, exc)
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used: the last to be pruned
        return Dataset(InMemoryTable(table.replace_schema_metadata(None).select(list(COLUMNS))))

    def store(self, key: str, dataset: Dataset) -> Path | None:
        """Write ``dataset`` (its ``COLUMNS``) atomically; a failure is logged, never raised (it is only a cache)."""
        table: pa.Table = dataset.select_columns(list(COLUMNS)).with_format("arrow")[:]
        table = table.replace_schema_metadata({_KEY_META: key.encode()})
        target = self.path(key)
        tmp: str | None = None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{key[:16]}-", suffix=".tmp", dir=self.dir)
            with os.fdopen(fd, "wb") as f:
                pq.write_table(table, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
            tmp = None
        except (OSError, pa.ArrowException) as exc:
            log.warning("could not write prepared-data cache entry %s: %s", target, exc)
            return None
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        self.prune(keep=target)
        return target

    def prune(self, keep: Path | None = None) -> list[Path]:
        """Delete least recently used entries beyond ``max_bytes`` and dead writers' temp files."""
        removed: list[Path] = []
        now = time.time()
        entries: list[tuple[float, int, Path]] = []
        for path in self.dir.glob("*"):
            try:
                st = path.stat()
            except OSError:
                continue
            if path.suffix == ".tmp":
                if now - st.st_mtime > STALE_TMP_SECONDS:
                    removed.append(path)
            elif path.suffix == ".parquet":
                entries.append((st.st_mtime, st.st_size, path))
        total = sum(size for _, size, _ in entries)
        if self.max_bytes is not None:
            for _, size, path in sorted(entries):
                if total <= self.max_bytes:
                    break
                if path != keep:
                    removed.append(path)
                    total -= size
        for path in removed:
            with contextlib.suppress(OSError):
                path.unlink()
        if removed:
            log.info("prepared-data cache: pruned %d entries/temp files", len(removed))
        return removed


class PreparedInputs:
    """The tokenized pairs with their reference log-probs from the cache (``request.cache_dir``), when
    there; after the trainer is built, stores what it prepared for the next attempt or job."""

    def __init__(self, request: TrainRequest, cfg: TrainingConfig, tokenizer: Any, device: str) -> None:
        self.cache = PreparedCache(request.cache_dir, request.cache_max_bytes) if request.cache_dir else None
        self.keys: dict[str, str] = {}
        self.train: Any = None
        self.eval: Any = None
        if self.cache is None:
            return
        settings = {
            "max_length": cfg.max_length,
            "truncation_mode": "keep_start",  # DPOConfig's default, as used here
            "quantization": cfg.quantization,
            "double_quant": cfg.double_quant,
            "compute_dtype": cfg.compute_dtype,
            "device": device,
            # the reference is the base with these adapters merged in: their weights are part of the key
            "parent_adapters": [file_sha256(Path(d) / "adapter_model.safetensors") for d in request.parent_adapters],
        }
        files = {"train": request.train_file, "eval": request.validation_file}
        for split, path in files.items():
            if path:
                self.keys[split] = prepared_key(
                    path, model_path=request.model_path, tokenizer=tokenizer, settings=settings
                )

    def load(self, precompute: bool) -> bool:
        """Loads cached entries; returns whether reference log-probs are precomputed (always on a hit)."""
        if self.cache is None:
            return precompute
        self.train = self.cache.load(self.keys["train"])
        if self.train is not None or precompute:
            if "eval" in self.keys:
                self.eval = self.cache.load(self.keys["eval"])
            return True
        return False

    def report_and_store(self, trainer: Any, reporter: Reporter) -> None:
        if trainer.ref_logps_pairs:
            seconds = trainer.ref_logps_seconds
            reporter.event(
                f"reference log-probs of {trainer.ref_logps_pairs} pairs computed in {seconds:.1f}s",
                data={"ref_logps_seconds": round(seconds, 3), "ref_logps_pairs": trainer.ref_logps_pairs},
            )
        if self.cache is None or not trainer.precompute_ref_logps:
            return
        hits = [split for split, ds in (("train", self.train), ("eval", self.eval)) if ds is not None]
        if hits:
            reporter.event(f"tokenized pairs and reference log-probs ({', '.join(hits)}) loaded from the cache")
        for split, dataset in (("train", trainer.train_dataset), ("eval", trainer.eval_dataset)):
            if split in self.keys and split not in hits and dataset is not None:
                self.cache.store(self.keys[split], dataset)
