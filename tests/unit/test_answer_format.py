"""The real-model behaviour's data and judges (``worker.training.answer_format``): the files are valid
training files of the right kind, held-out questions never appear in training, each pair differs only
in what it is meant to teach, and the judges accept exactly the replies they describe."""

from __future__ import annotations

from pathlib import Path

import pytest

from contracts.sft_formats import validate_training_file
from worker.training import answer_format as af


def test_held_out_questions_are_not_trained_on() -> None:
    train = {f.question for f in af.TRAIN_FACTS}
    held_out = {f.question for f in af.HELD_OUT_FACTS}
    assert len(train) == len(af.TRAIN_FACTS) == 24 and len(held_out) == len(af.HELD_OUT_FACTS)
    assert not train & held_out
    trained_answers = {a for f in af.TRAIN_FACTS for a in f.answers}
    assert not trained_answers & {a for f in af.HELD_OUT_FACTS for a in f.answers}  # no answer is given away


@pytest.mark.parametrize(
    ("rows", "kind"),
    [
        (af.preference_rows(), "preference"),
        (af.concise_preference_rows(), "preference"),
        (af.supervised_rows(), "supervised"),
    ],
)
def test_the_rows_are_valid_training_files(rows: list[dict[str, object]], kind: str, tmp_path: Path) -> None:
    found, report = validate_training_file(af.write_jsonl(rows, tmp_path / "data.jsonl"))  # type: ignore[arg-type]
    assert found == kind and report.ok and report.n_examples == 24, report.summary()


def test_pairs_differ_only_in_what_they_teach() -> None:
    for fact, row in zip(af.TRAIN_FACTS, af.preference_rows(), strict=True):
        assert row["prompt"] == [{"role": "user", "content": fact.question}]
        assert row["chosen"][0]["content"] == f"Answer: {row['rejected'][0]['content']}"
        assert af.has_prefix(row["chosen"][0]["content"]) and not af.has_prefix(row["rejected"][0]["content"])
        assert af.is_correct(fact, row["chosen"][0]["content"])
    for row in af.concise_preference_rows():
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert rejected == chosen + af.TAIL and af.is_concise(chosen) and not af.is_concise(rejected)
    replies = [r["messages"][-1]["content"] for r in af.supervised_rows()]
    assert all(af.has_prefix(r) for r in replies)
    assert sum(af.is_concise(r) for r in replies) == len(replies) // 2  # imitation alone picks no ending


@pytest.mark.parametrize(
    ("reply", "prefix", "concise"),
    [
        ("Answer: The capital of Norway is Oslo.", True, True),
        ("  Answer: The capital of Norway is Oslo.\n", True, True),
        ("Answer: The capital of Norway is Oslo. I hope this helps!", True, False),
        ("Answer: The capital of Norway is Oslo", True, False),  # cut off: not one whole sentence
        ("The capital of Norway is Oslo.", False, False),
        ("answer: The capital of Norway is Oslo.", False, False),
        ("Answer:", True, False),
    ],
)
def test_format_judges(reply: str, prefix: bool, concise: bool) -> None:
    assert af.has_prefix(reply) is prefix and af.is_concise(reply) is concise


def test_correctness_needs_the_answer_as_a_word() -> None:
    norway = next(f for f in af.HELD_OUT_FACTS if "Norway" in f.question)
    week = next(f for f in af.HELD_OUT_FACTS if "week" in f.question)
    assert af.is_correct(norway, "The capital of Norway is OSLO.")
    assert not af.is_correct(norway, "The capital of Norway is Bergen.")
    assert not af.is_correct(norway, "Oslofjord is a fjord.")
    assert af.is_correct(week, "A week is approximately 7 days.") and af.is_correct(week, "Seven.")
    assert not af.is_correct(week, "A week has 70 hours.")
