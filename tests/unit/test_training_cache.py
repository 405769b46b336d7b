"""worker.training.ref_cache: keys, atomic writes, corrupt entries, and the hit on a second run (no model run)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from datasets import Dataset

from contracts.method import Method
from worker.training.recipe import TrainingConfig
from worker.training.ref_cache import COLUMNS, PreparedCache, PreparedInputs, prepared_key
from worker.training.reporter import ListReporter
from worker.training.request import TrainRequest

ROW = {"prompt": [{"role": "user", "content": "What is 1 plus 2?"}]}


class FakeTokenizer:
    chat_template = "{{ messages }}"
    bos_token, eos_token, pad_token = "<s>", "</s>", "<pad>"
    padding_side = "right"


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "mistral", "hidden_size": 192}))
    (model / "tokenizer.json").write_text('{"vocab": {}}')
    (model / "model.safetensors").write_bytes(b"\x01" * 3_000_000)
    return model


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(ROW) + "\n")
    return path


def _key(data: Path, model: Path, tokenizer: Any = None, **settings: Any) -> str:
    return prepared_key(
        data, model_path=model, tokenizer=tokenizer or FakeTokenizer(), settings={"max_length": 64, **settings}
    )


def _prepared(n: int = 3, offset: float = 0.0) -> Dataset:
    return Dataset.from_list(
        [
            {
                "prompt_ids": [1, 2, 3][: i + 1],
                "chosen_ids": [4, 5],
                "rejected_ids": [6],
                "ref_chosen_logps": -1.5 - i - offset,
                "ref_rejected_logps": -2.25 - i,
                "prompt": "dropped: only the prepared columns are cached",
            }
            for i in range(n)
        ]
    )


def test_key_is_stable_and_changes_with_what_changes_the_rows(data_file: Path, model_dir: Path) -> None:
    key = _key(data_file, model_dir)
    assert key == _key(data_file, model_dir)
    assert _key(data_file, model_dir, max_length=128) != key
    assert _key(data_file, model_dir, device="cuda") != key

    data_file.write_text(json.dumps(ROW).replace("1 plus 2", "1 plus 3") + "\n")
    assert _key(data_file, model_dir) != key
    data_file.write_text(json.dumps(ROW) + "\n")
    assert _key(data_file, model_dir) == key

    templated = FakeTokenizer()
    templated.chat_template = "{{ other }}"
    assert _key(data_file, model_dir, tokenizer=templated) != key
    padded = FakeTokenizer()
    padded.pad_token = "</s>"
    assert _key(data_file, model_dir, tokenizer=padded) != key

    (model_dir / "tokenizer.json").write_text('{"vocab": {"a": 0}}')
    assert _key(data_file, model_dir) != key
    (model_dir / "tokenizer.json").write_text('{"vocab": {}}')
    weights = bytearray((model_dir / "model.safetensors").read_bytes())
    weights[-1] = 2  # a changed checkpoint: the sampled tail differs
    (model_dir / "model.safetensors").write_bytes(bytes(weights))
    assert _key(data_file, model_dir) != key


def test_store_then_load_round_trips_only_the_prepared_columns(tmp_path: Path) -> None:
    cache = PreparedCache(tmp_path / "cache")
    assert cache.load("k" * 64) is None
    path = cache.store("k" * 64, _prepared())
    assert path == cache.path("k" * 64) and path.exists()
    assert [p.name for p in cache.dir.iterdir()] == [path.name]  # no temporary file left behind
    loaded = cache.load("k" * 64)
    assert loaded is not None
    assert loaded.column_names == list(COLUMNS)
    assert loaded.to_list() == _prepared().select_columns(list(COLUMNS)).to_list()


def test_store_keeps_the_rows_a_filter_left(tmp_path: Path) -> None:
    cache = PreparedCache(tmp_path)
    filtered = _prepared(3).filter(lambda row: len(row["prompt_ids"]) != 2)
    cache.store("f" * 64, filtered)
    loaded = cache.load("f" * 64)
    assert loaded is not None and [r["prompt_ids"] for r in loaded] == [[1], [1, 2, 3]]


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),  # partial write
        lambda p: p.write_bytes(b"not parquet at all"),
        lambda p: p.write_bytes(b""),
    ],
    ids=["truncated", "garbage", "empty"],
)
def test_a_corrupt_entry_is_ignored_removed_and_rebuilt(tmp_path: Path, damage: Any) -> None:
    cache = PreparedCache(tmp_path)
    path = cache.store("c" * 64, _prepared())
    assert path is not None
    damage(path)
    assert cache.load("c" * 64) is None
    assert not path.exists()
    cache.store("c" * 64, _prepared(offset=1.0))
    loaded = cache.load("c" * 64)
    assert loaded is not None and loaded[0]["ref_chosen_logps"] == -2.5


def test_an_entry_under_another_key_is_not_trusted(tmp_path: Path) -> None:
    cache = PreparedCache(tmp_path)
    path = cache.store("a" * 64, _prepared())
    assert path is not None
    path.rename(cache.path("b" * 64))
    assert cache.load("b" * 64) is None


def test_an_entry_without_reference_log_probs_is_rejected(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    cache = PreparedCache(tmp_path)
    path = cache.store("d" * 64, _prepared())
    assert path is not None
    table = pq.read_table(path)
    pq.write_table(table.drop(["ref_rejected_logps"]), path)
    assert cache.load("d" * 64) is None


def test_a_cache_that_cannot_be_written_is_only_a_warning(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory should be")
    assert PreparedCache(blocker).store("e" * 64, _prepared()) is None


def _request(tmp_path: Path, model: Path, data: Path, cache: Path | None) -> TrainRequest:
    return TrainRequest(
        job_id="job",
        attempt=1,
        model_path=str(model),
        train_file=str(data),
        output_dir=str(tmp_path / "out"),
        method=Method(type="ipo"),
        cache_dir=str(cache) if cache else None,
    )


def _trainer(train: Dataset, seconds: float = 0.0, pairs: int = 0) -> Any:
    return SimpleNamespace(
        train_dataset=train, eval_dataset=None, precompute_ref_logps=True, ref_logps_seconds=seconds,
        ref_logps_pairs=pairs,
    )  # fmt: skip


def test_a_second_run_hits_what_the_first_stored(tmp_path: Path, model_dir: Path, data_file: Path) -> None:
    cfg = TrainingConfig(max_length=64, precompute_ref_log_probs=False, device="cpu")
    request = _request(tmp_path, model_dir, data_file, tmp_path / "cache")

    first = PreparedInputs(request, cfg, FakeTokenizer(), "cpu")
    assert first.load(precompute=True) is True and first.train is None
    reporter = ListReporter()
    first.report_and_store(_trainer(_prepared(), seconds=1.25, pairs=3), reporter)
    (event,) = reporter.of_kind("event")
    assert event.data == {"ref_logps_seconds": 1.25, "ref_logps_pairs": 3}

    second = PreparedInputs(request, cfg, FakeTokenizer(), "cpu")
    assert second.load(precompute=False) is True  # a hit turns precomputed reference log-probs on
    assert second.train is not None and second.train.to_list() == _prepared().select_columns(list(COLUMNS)).to_list()
    reporter = ListReporter()
    second.report_and_store(_trainer(second.train), reporter)
    assert [e.message for e in reporter.of_kind("event")] == [
        "tokenized pairs and reference log-probs (train) loaded from the cache"
    ]

    longer = PreparedInputs(request, cfg.model_copy(update={"max_length": 128}), FakeTokenizer(), "cpu")
    assert longer.load(precompute=False) is False and longer.train is None


def test_no_cache_dir_means_no_cache(tmp_path: Path, model_dir: Path, data_file: Path) -> None:
    cfg = TrainingConfig(max_length=64, device="cpu")
    inputs = PreparedInputs(_request(tmp_path, model_dir, data_file, None), cfg, FakeTokenizer(), "cpu")
    assert inputs.load(precompute=True) is True and inputs.load(precompute=False) is False
    inputs.report_and_store(_trainer(_prepared()), ListReporter())
    assert not (tmp_path / "cache").exists()


def test_the_cache_is_bounded_least_recently_used_first(tmp_path: Path) -> None:
    import os
    import time

    probe = PreparedCache(tmp_path / "probe")
    entry_size = probe.store("p" * 64, _prepared(50)).stat().st_size  # type: ignore[union-attr]
    cache = PreparedCache(tmp_path / "cache", max_bytes=int(entry_size * 2.5))
    old = time.time() - 1000
    for i, key in enumerate(("a" * 64, "b" * 64)):
        path = cache.store(key, _prepared(50))
        assert path is not None
        os.utime(path, (old + i, old + i))  # a written first, b second
    assert cache.load("a" * 64) is not None  # a hit: a is now the most recently used
    stale = cache.dir / ".dead-writer.tmp"
    stale.write_bytes(b"x")
    os.utime(stale, (old - 5000, old - 5000))  # older than STALE_TMP_SECONDS
    cache.store("c" * 64, _prepared(50))  # three entries exceed 2.5: the least recently used (b) goes
    assert sorted(p.name[0] for p in cache.dir.glob("*.parquet")) == ["a", "c"]
    assert not stale.exists()
    tiny = PreparedCache(tmp_path / "tiny", max_bytes=1)
    assert tiny.store("d" * 64, _prepared(50)) is not None and tiny.load("d" * 64) is not None  # kept: just written
