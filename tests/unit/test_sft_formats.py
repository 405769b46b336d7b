"""The supervised-data validator: every accepted shape normalised, every refusal line-numbered with its reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from contracts.data_formats import ValidationReport
from contracts.sft_formats import SupervisedExample, parse_supervised_lines, training_file_kind, validate_training_file

U = {"role": "user", "content": "What is 1 plus 2?"}
A = {"role": "assistant", "content": "The sum is 3."}


def _one(record: object) -> tuple[list[SupervisedExample], ValidationReport]:
    return parse_supervised_lines([json.dumps(record)])


def test_openai_messages_with_weights() -> None:
    sys = {"role": "system", "content": "Be brief."}
    skipped = {**A, "content": "The product is 2.", "weight": 0}
    examples, report = _one({"messages": [sys, U, skipped, U, {**A, "weight": 1}]})
    assert report.ok and report.format == "messages"
    (ex,) = examples
    assert ex.trained == [False, False, False, False, True]
    assert all(set(m) == {"role", "content"} for m in ex.messages or [])
    assert ex.prompt == [sys, U, {"role": "assistant", "content": "The product is 2."}, U]


def test_prompt_completion_text_and_conversational() -> None:
    examples, report = _one({"prompt": "What is 1 plus 2?", "completion": "The sum is 3."})
    assert report.ok and report.format == "prompt_completion"
    assert examples[0].messages == [U, A] and examples[0].trained == [False, True]
    examples, report = _one({"prompt": [U], "completion": [A]})
    assert report.ok and examples[0].messages == [U, A]


def test_language_modeling_text() -> None:
    examples, report = _one({"text": "Once upon a time."})
    assert report.ok and report.format == "language_modeling" and examples[0].text == "Once upon a time."
    assert examples[0].prompt is None


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"messages": [U, A], "tools": [{"type": "function"}]}, '"tools" is not supported'),
        ({"messages": [U, {**A, "tool_calls": [{"id": "c1"}]}]}, "tool calls are not supported"),
        ({"messages": [U, {"role": "tool", "content": "6"}]}, "tool calls are not supported"),
        ({"messages": [U, {**A, "name": "bot"}]}, 'key "name" is not used in training'),
        ({"messages": [{**U, "weight": 1}, A]}, "weight applies to assistant messages only"),
        ({"messages": [U]}, "no assistant turn to train on"),
        ({"messages": [U, {**A, "weight": 0}]}, "no assistant turn to train on"),
        ({"messages": [U, {**A, "weight": 2}]}, "weight must be 0 or 1"),
        ({"messages": [A, U, A]}, "must follow a user turn"),
        ({"messages": [U, {**A, "content": " "}]}, "empty assistant reply"),
        ({"messages": [U, {"role": "robot", "content": "x"}]}, 'role "robot"'),
        ({"prompt": "hi", "completion": [A]}, "both be strings or both be lists"),
        ({"prompt": [A], "completion": [A]}, "must end with a user turn"),
        ({"prompt": [U], "completion": [U]}, 'role must be "assistant"'),
        ({"text": ""}, "text is empty"),
        ({"text": "x", "label": 1}, 'unexpected key(s) "label"'),
        ({"prompt": "p", "chosen": "a", "rejected": "b"}, 'use method "ipo" or "dpo"'),
    ],
)
def test_refusals_name_the_line_and_reason(record: dict[str, object], reason: str) -> None:
    if "completion" in record:
        good = json.dumps({"prompt": "hi", "completion": "hello"})
    elif "text" in record:
        good = json.dumps({"text": "hello"})
    else:
        good = json.dumps({"messages": [U, A]})  # a line of the same shape: the error is the record's own
    examples, report = parse_supervised_lines([good, json.dumps(record)])
    assert not report.ok and len(examples) == 1
    (error,) = report.errors
    assert error.line == 2 and reason in error.reason, error.reason


def test_mixed_shapes_and_empty_files() -> None:
    _, report = parse_supervised_lines([json.dumps({"messages": [U, A]}), json.dumps({"text": "x"})])
    assert not report.ok and 'mixed shapes: line 1 is "messages"' in report.errors[0].reason
    _, report = parse_supervised_lines(["", "  "])
    assert not report.ok and "file is empty" in report.summary()


def test_kind_detection(tmp_path: Path) -> None:
    sft, pref, broken = tmp_path / "s.jsonl", tmp_path / "p.jsonl", tmp_path / "b.jsonl"
    sft.write_text("\n" + json.dumps({"messages": [U, A]}) + "\n")
    pref.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    broken.write_text("not json\n")
    assert training_file_kind(sft) == "supervised" and training_file_kind(pref) == "preference"
    assert training_file_kind(broken) == "preference"
    kind, report = validate_training_file(sft)
    assert kind == "supervised" and report.ok and report.format == "messages"
    kind, report = validate_training_file(pref)
    assert kind == "preference" and report.ok
