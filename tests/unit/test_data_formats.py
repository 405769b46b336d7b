"""contracts.data_formats: every accepted shape, every error kind, hostile input; real files in tmp_path."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from contracts.data_formats import (
    FILE_LEVEL,
    MAX_LINE_BYTES,
    LineError,
    PreferenceExample,
    ValidationReport,
    parse_preference_file,
    parse_preference_lines,
)

Record = dict[str, object]

USER = {"role": "user", "content": "What is 2+2?"}
GOOD = {"role": "assistant", "content": "4."}
BAD = {"role": "assistant", "content": "5."}
SYSTEM = {"role": "system", "content": "Be terse."}
EXPECTED = PreferenceExample(prompt=[USER], chosen=[GOOD], rejected=[BAD], line=1)

TEXT: Record = {"prompt": "What is 2+2?", "chosen": "4.", "rejected": "5."}
CONVERSATIONAL: Record = {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}
IMPLICIT: Record = {"chosen": [USER, GOOD], "rejected": [USER, BAD]}
OPENAI: Record = {"input": {"messages": [USER]}, "preferred_output": [GOOD], "non_preferred_output": [BAD]}


def write(tmp_path: Path, lines: Sequence[object], name: str = "train.jsonl") -> Path:
    """Write records (dumped as JSON) or raw str/bytes lines, one a line."""
    path = tmp_path / name
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, bytes):
                f.write(line + b"\n")
            elif isinstance(line, str):
                f.write(line.encode("utf-8") + b"\n")
            else:
                f.write(json.dumps(line).encode("utf-8") + b"\n")
    return path


def parse(tmp_path: Path, lines: Sequence[object], **kwargs: Any) -> tuple[list[PreferenceExample], ValidationReport]:
    return parse_preference_file(write(tmp_path, lines), **kwargs)


def only_error(report: ValidationReport) -> LineError:
    assert not report.ok
    assert report.error_count == 1, report.errors
    return report.errors[0]


# --- every accepted shape normalises to the same example -------------------------------------------


@pytest.mark.parametrize(
    ("record", "fmt"),
    [
        (TEXT, "text"),
        (CONVERSATIONAL, "conversational"),
        (IMPLICIT, "implicit_prompt"),
        (OPENAI, "openai_preference"),
        # tolerated extras: ids, scores, UltraFeedback's "messages" and plain-text "prompt", OpenAI tools
        ({**TEXT, "id": 7, "meta": {"x": [1, 2]}}, "text"),
        (
            {
                **IMPLICIT,
                "prompt": "What is 2+2?",
                "prompt_id": "ab",
                "messages": [USER, GOOD],
                "score_chosen": 8.0,
                "score_rejected": 3.5,
            },
            "implicit_prompt",
        ),
        # OpenAI's flags and empty tool fields carry nothing to train on
        (
            {**OPENAI, "input": {"messages": [USER], "tools": [], "parallel_tool_calls": True}},
            "openai_preference",
        ),
        # bookkeeping keys on a message, and empty ones, carry no content
        ({**CONVERSATIONAL, "prompt": [{**USER, "id": "m1", "name": None, "tool_calls": []}]}, "conversational"),
        # OpenAI's content parts (text only), ShareGPT turns (LLaMA-Factory's preference shape)
        (
            {**CONVERSATIONAL, "prompt": [{"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]}]},
            "conversational",
        ),
        (
            {
                "conversations": [{"from": "human", "value": "What is 2+2?"}],
                "chosen": {"from": "gpt", "value": "4."},
                "rejected": {"from": "gpt", "value": "5."},
            },
            "sharegpt",
        ),
    ],
)
def test_each_format_normalises_to_the_same_example(tmp_path: Path, record: Record, fmt: str) -> None:
    examples, report = parse(tmp_path, [record])
    assert (report.ok, report.n_examples, report.format, report.errors) == (True, 1, fmt, [])
    ex = examples[0]
    assert (ex.prompt, ex.chosen, ex.rejected, ex.line) == (EXPECTED.prompt, EXPECTED.chosen, EXPECTED.rejected, 1)
    assert ex.text == (("What is 2+2?", "4.", "5.") if fmt == "text" else None)
    assert report.text_mode == ("chat_template" if fmt == "text" else None)


@pytest.mark.parametrize(
    "record",
    [
        {"prompt": [SYSTEM, USER, GOOD, USER], "chosen": [GOOD], "rejected": [BAD]},
        {"chosen": [SYSTEM, USER, GOOD, USER, GOOD], "rejected": [SYSTEM, USER, GOOD, USER, BAD]},
        {
            "input": {"messages": [SYSTEM, USER, GOOD, USER]},
            "preferred_output": [GOOD],
            "non_preferred_output": [BAD],
        },
    ],
)
def test_multi_turn_history_stays_in_the_prompt(tmp_path: Path, record: Record) -> None:
    examples, report = parse(tmp_path, [record])
    assert report.ok, report.errors
    assert examples[0].prompt == [SYSTEM, USER, GOOD, USER]
    assert (examples[0].chosen, examples[0].rejected) == ([GOOD], [BAD])


def test_multi_message_replies_are_kept(tmp_path: Path) -> None:
    record = {"prompt": [USER], "chosen": [GOOD, GOOD], "rejected": [BAD]}
    examples, report = parse(tmp_path, [record])
    assert report.ok and examples[0].chosen == [GOOD, GOOD]


def test_lines_api_takes_str_and_bytes_with_or_without_newlines() -> None:
    lines: list[bytes | str] = [
        json.dumps(TEXT) + "\n",
        json.dumps(TEXT).encode(),
        b"\r\n",
        json.dumps(TEXT) + "\r\n",
    ]
    examples, report = parse_preference_lines(lines)
    assert report.ok and report.n_examples == 3
    assert [e.line for e in examples] == [1, 2, 4]


def test_blank_lines_are_ignored_but_counted(tmp_path: Path) -> None:
    examples, report = parse(tmp_path, ["", TEXT, "   ", "\t", TEXT, ""])
    assert report.ok and report.n_examples == 2
    assert [e.line for e in examples] == [2, 5]


def test_utf8_bom_and_crlf_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(TEXT).encode() + b"\r\n" + json.dumps(TEXT).encode() + b"\r\n")
    examples, report = parse_preference_file(str(path))
    assert report.ok and report.n_examples == 2
    assert (examples[0].prompt, examples[0].chosen, examples[0].rejected) == (
        EXPECTED.prompt,
        EXPECTED.chosen,
        EXPECTED.rejected,
    )


def test_non_ascii_content_survives(tmp_path: Path) -> None:
    record = {"prompt": "Grüß dich 👋", "chosen": "你好", "rejected": "héllo"}
    examples, report = parse(tmp_path, [record])
    assert report.ok
    assert examples[0].prompt[0]["content"] == "Grüß dich 👋"
    assert examples[0].chosen[0]["content"] == "你好"


# --- each error kind: the right line number and a clear reason ---------------------------------------

# (case, a good record of the same shape, the bad line, a substring of the reason)
ERROR_CASES: list[tuple[str, Record, object, str]] = [
    (
        "malformed json",
        TEXT,
        '{"prompt": "a", "chosen": "b" "rejected": "c"}',
        "malformed JSON: Expecting ',' delimiter at column 31",
    ),
    ("truncated json", TEXT, '{"prompt": "a", ', "malformed JSON"),
    ("not an object", TEXT, "[1, 2, 3]", "expected a JSON object, got array"),
    ("string line", TEXT, '"hello"', "expected a JSON object, got string"),
    (
        "unknown shape",
        TEXT,
        {"question": "q", "answer": "a"},
        'unknown shape: found keys ["answer", "question"]',
    ),
    ("missing rejected", TEXT, {"prompt": "q", "chosen": "a"}, 'missing "rejected"'),
    (
        "half openai",
        OPENAI,
        {"input": {"messages": [USER]}, "preferred_output": [GOOD]},
        'missing "non_preferred_output"',
    ),
    (
        "bad role",
        CONVERSATIONAL,
        {**CONVERSATIONAL, "prompt": [{"role": "narrator", "content": "x"}, USER]},
        'prompt message 1: role "narrator" is not one of system, user, assistant',
    ),
    (
        "role not a string",
        CONVERSATIONAL,
        {**CONVERSATIONAL, "chosen": [{"role": 3, "content": "x"}]},
        "chosen message 1: role number",
    ),
    (
        "missing role",
        CONVERSATIONAL,
        {**CONVERSATIONAL, "chosen": [{"content": "x"}]},
        'chosen message 1 has no "role"',
    ),
    (
        "missing content",
        CONVERSATIONAL,
        {**CONVERSATIONAL, "rejected": [{"role": "assistant"}]},
        'rejected message 1 has no "content"',
    ),
    (
        "message not an object",
        CONVERSATIONAL,
        {**CONVERSATIONAL, "prompt": ["hi"]},
        "prompt message 1 must be an object (got string)",
    ),
    (
        "prompt ends with assistant",
        CONVERSATIONAL,
        {**CONVERSATIONAL, "prompt": [USER, GOOD]},
        'prompt must end with a user turn (its last message is "assistant")',
    ),
    (
        "reply not assistant",
        CONVERSATIONAL,
        {**CONVERSATIONAL, "chosen": [USER]},
        'chosen message 1: role must be "assistant" (got "user")',
    ),
    (
        "openai reply not assistant",
        OPENAI,
        {**OPENAI, "non_preferred_output": [USER]},
        'non_preferred_output message 1: role must be "assistant"',
    ),
    (
        "content not a string",
        CONVERSATIONAL,
        {**CONVERSATIONAL, "chosen": [{"role": "assistant", "content": None}]},
        "chosen message 1: content must be a string or a list of text parts (got null)",
    ),
    (
        "image content part",
        CONVERSATIONAL,
        {**CONVERSATIONAL, "prompt": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        'prompt message 1: content part 1 is "image_url": only text parts',
    ),
    ("lone surrogate", TEXT, '{"prompt": "\\ud800", "chosen": "a", "rejected": "b"}', "not valid Unicode"),
    (
        "text reply not a string",
        TEXT,
        {**TEXT, "rejected": 5},
        "text format: rejected must be a string (got number)",
    ),
    (
        "prompt wrong type",
        CONVERSATIONAL,
        {**CONVERSATIONAL, "prompt": None},
        "prompt must be a list of messages (got null)",
    ),
    ("empty chosen text", TEXT, {**TEXT, "chosen": ""}, "chosen is empty"),
    ("whitespace rejected", TEXT, {**TEXT, "rejected": " \n\t"}, "rejected is empty"),
    ("empty reply list", CONVERSATIONAL, {**CONVERSATIONAL, "chosen": []}, "chosen is empty"),
    ("empty prompt text", TEXT, {**TEXT, "prompt": "  "}, "prompt is empty"),
    ("empty prompt list", CONVERSATIONAL, {**CONVERSATIONAL, "prompt": []}, "prompt is empty"),
    ("identical text", TEXT, {**TEXT, "rejected": "4."}, "chosen and rejected are identical"),
    ("identical but whitespace", TEXT, {**TEXT, "rejected": " 4.\n"}, "chosen and rejected are identical"),
    (
        "identical openai",
        OPENAI,
        {**OPENAI, "non_preferred_output": [GOOD]},
        "preferred_output and non_preferred_output are identical",
    ),
    (
        "identical implicit",
        IMPLICIT,
        {"chosen": [USER, GOOD], "rejected": [USER, GOOD]},
        "chosen and rejected are identical",
    ),
    (
        "implicit no shared prompt",
        IMPLICIT,
        {"chosen": [USER, GOOD], "rejected": [{**USER, "content": "other"}, BAD]},
        "share no prompt",
    ),
    (
        "implicit prefix ends with assistant",
        IMPLICIT,
        {"chosen": [USER, GOOD, USER, GOOD], "rejected": [USER, GOOD, BAD]},
        'must end with a user turn (its last message, 2, is "assistant")',
    ),
    (
        "implicit no reply",
        IMPLICIT,
        {"chosen": [USER, GOOD], "rejected": [USER]},
        "rejected is empty: no reply after the shared prompt",
    ),
    (
        "implicit text replies without a shared prompt",
        {"chosen": "Q: x? A: yes", "rejected": "Q: x? A: no"},
        {"chosen": "a", "rejected": "b"},
        "implicit prompt: chosen and rejected share no prompt",
    ),
    (
        "implicit text and messages mixed",
        IMPLICIT,
        {"chosen": [USER, GOOD], "rejected": "b"},
        "use strings for both (text) or messages for both",
    ),
    (
        "openai input not an object",
        OPENAI,
        {**OPENAI, "input": [USER]},
        'input must be an object with a "messages" list (got array)',
    ),
    (
        "openai prompt ends with assistant",
        OPENAI,
        {**OPENAI, "input": {"messages": [USER, GOOD]}},
        "input.messages must end with a user turn",
    ),
    (
        "huge integer",
        TEXT,
        '{"prompt": "a", "chosen": "b", "rejected": "c", "n": ' + "9" * 5000 + "}",
        "malformed JSON",
    ),
]


@pytest.mark.parametrize(("case", "good", "bad_line", "reason"), ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_error_kinds_report_line_and_reason(
    tmp_path: Path, case: str, good: Record, bad_line: object, reason: str
) -> None:
    # the bad line is line 3, between good lines of its shape (so no "mixed shapes" error) and a blank
    examples, report = parse(tmp_path, [good, "", bad_line, good])
    error = only_error(report)
    assert error.line == 3
    assert reason in error.reason, error.reason
    assert [e.line for e in examples] == [1, 4]
    assert report.n_examples == 2


# --- mixed shapes ---------------------------------------------------------------------------------


def test_mixed_shapes_name_the_first_shape_and_the_line_shape(tmp_path: Path) -> None:
    examples, report = parse(tmp_path, ["", TEXT, CONVERSATIONAL, TEXT, OPENAI])
    assert report.format == "text"
    assert [e.line for e in examples] == [2, 4]
    assert [(e.line, e.reason) for e in report.errors] == [
        (3, 'mixed shapes: line 2 is "text" but this line is "conversational"'),
        (5, 'mixed shapes: line 2 is "text" but this line is "openai_preference"'),
    ]


def test_first_shape_is_set_by_a_recognised_line_even_if_it_is_invalid(tmp_path: Path) -> None:
    _, report = parse(tmp_path, ["{oops", {**IMPLICIT, "rejected": []}, TEXT])
    assert report.format == "implicit_prompt"
    assert [e.line for e in report.errors] == [1, 2, 3, FILE_LEVEL]
    assert 'line 2 is "implicit_prompt" but this line is "text"' in report.errors[2].reason


# --- hostile input ----------------------------------------------------------------------------------


def test_max_errors_caps_the_list_but_error_count_counts_all(tmp_path: Path) -> None:
    lines: list[object] = [TEXT, *["{bad"] * 500, TEXT]
    examples, report = parse(tmp_path, lines, max_errors=5)
    assert len(examples) == 2 and examples[-1].line == 502
    assert report.error_count == 500
    assert [e.line for e in report.errors] == [2, 3, 4, 5, 6]
    assert report.summary().endswith(
        "line 6: malformed JSON: Expecting property name enclosed in double quotes at column 2; (and 495 more)"
    )


def test_file_level_error_is_always_kept_within_the_cap(tmp_path: Path) -> None:
    _, report = parse(tmp_path, ["{bad"] * 10, max_errors=3)
    assert report.error_count == 11
    assert [e.line for e in report.errors] == [1, 2, FILE_LEVEL]
    assert report.errors[-1].reason == "too few examples: 0 valid, at least 1 needed"


def test_non_utf8_bytes(tmp_path: Path) -> None:
    bad = b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}'
    examples, report = parse(tmp_path, [TEXT, bad, TEXT, b"\xff\xfe{}"])
    assert [(e.line, e.reason) for e in report.errors] == [
        (2, "not valid UTF-8: byte 0xe9 at byte offset 15"),
        (4, "not valid UTF-8: byte 0xff at byte offset 0"),
    ]
    assert len(examples) == 2


@pytest.mark.parametrize("line", ["[" * 100_000, '{"prompt": ' + "[" * 100_000, '{"a": ' + '{"b": ' * 50_000])
def test_deep_nesting_is_reported_not_raised(tmp_path: Path, line: str) -> None:
    examples, report = parse(tmp_path, [TEXT, line, TEXT])
    error = only_error(report)
    assert error.line == 2 and "malformed JSON" in error.reason
    assert len(examples) == 2


def test_moderately_deep_extra_keys_are_tolerated(tmp_path: Path) -> None:
    line = json.dumps(TEXT)[:-1] + ', "meta": ' + "[" * 200 + "]" * 200 + "}"
    _, report = parse(tmp_path, [line])
    assert report.ok


def test_over_long_line_is_reported_without_parsing_and_numbering_continues(tmp_path: Path) -> None:
    long_line = '{"prompt": "' + "x" * MAX_LINE_BYTES + '", "chosen": "a", "rejected": "b"}'
    examples, report = parse(tmp_path, [TEXT, long_line, TEXT, "x" * (3 * MAX_LINE_BYTES), TEXT])
    assert [e.line for e in examples] == [1, 3, 5]
    assert [e.line for e in report.errors] == [2, 4]
    assert report.errors[0].reason == f"line is too long: {len(long_line)} bytes (limit {MAX_LINE_BYTES}); not parsed"
    assert (
        report.errors[1].reason == f"line is too long: {3 * MAX_LINE_BYTES} bytes (limit {MAX_LINE_BYTES}); not parsed"
    )


def test_over_long_last_line_without_newline(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_bytes(json.dumps(TEXT).encode() + b"\n" + b"y" * (MAX_LINE_BYTES + 10))
    _, report = parse_preference_file(path)
    assert [(e.line, e.reason) for e in report.errors] == [
        (2, f"line is too long: {MAX_LINE_BYTES + 10} bytes (limit {MAX_LINE_BYTES}); not parsed")
    ]


def test_line_of_exactly_the_limit_is_parsed(tmp_path: Path) -> None:
    head = json.dumps(TEXT)[:-1] + ', "pad": "'
    line = head + "p" * (MAX_LINE_BYTES - len(head) - 2) + '"}'
    assert len(line) == MAX_LINE_BYTES
    _, report = parse(tmp_path, [line])
    assert report.ok, report.errors


def test_over_long_item_in_lines_api() -> None:
    _, report = parse_preference_lines([json.dumps(TEXT), "z" * (MAX_LINE_BYTES + 1), b"z" * (MAX_LINE_BYTES + 1)])
    assert [e.line for e in report.errors] == [2, 3]
    assert all("line is too long" in e.reason for e in report.errors)


# --- file-level errors, OS errors ----------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"\xef\xbb\xbf\n"])
def test_empty_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    examples, report = parse_preference_file(path)
    assert examples == [] and report.format is None
    assert only_error(report) == LineError(line=FILE_LEVEL, reason="file is empty: no examples found")
    assert report.summary() == "training file is invalid: file is empty: no examples found"


def test_empty_file_allowed_when_no_examples_required(tmp_path: Path) -> None:
    _, report = parse(tmp_path, [""], min_examples=0)
    assert report.ok and report.n_examples == 0


def test_too_few_examples(tmp_path: Path) -> None:
    examples, report = parse(tmp_path, [TEXT, TEXT], min_examples=3)
    assert len(examples) == 2
    assert only_error(report) == LineError(line=FILE_LEVEL, reason="too few examples: 2 valid, at least 3 needed")


def test_os_errors_raise(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        parse_preference_file(tmp_path / "missing.jsonl")
    with pytest.raises(IsADirectoryError):
        parse_preference_file(tmp_path)


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError):
        parse_preference_lines([], max_errors=0)
    with pytest.raises(ValueError):
        parse_preference_lines([], min_examples=-1)


# --- summary() ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "kwargs", "expected"),
    [
        (
            [TEXT, TEXT],
            {},
            "training file is valid: 2 examples (format: text); 2 text rows: each prompt becomes a user turn and "
            "each reply an assistant turn, formatted with the chat template (no chat markup found in them)",
        ),
        ([CONVERSATIONAL], {}, "training file is valid: 1 examples (format: conversational)"),
        ([TEXT, "[]"], {}, "training file has 1 invalid line: line 2: expected a JSON object, got array"),
        (
            [TEXT, "[]", "1", TEXT, "null"],
            {"max_errors": 2},
            (
                "training file has 3 invalid lines: line 2: expected a JSON object, got array; "
                "line 3: expected a JSON object, got number; (and 1 more)"
            ),
        ),
        (
            ["1", "[]"],
            {"max_errors": 2},
            (
                "training file has 2 invalid lines: line 1: expected a JSON object, got number; (and 1 more); "
                "too few examples: 0 valid, at least 1 needed"
            ),
        ),
        (
            [TEXT],
            {"min_examples": 2},
            "training file is invalid: too few examples: 1 valid, at least 2 needed",
        ),
    ],
)
def test_summary(tmp_path: Path, lines: list[object], kwargs: dict[str, int], expected: str) -> None:
    _, report = parse(tmp_path, lines, **kwargs)
    assert report.summary() == expected


def test_summary_names_the_file() -> None:
    _, report = parse_preference_lines(["7"])
    assert report.summary("validation file").startswith("validation file has 1 invalid line: line 1:")


def test_report_round_trips_as_json() -> None:
    _, report = parse_preference_lines([json.dumps(TEXT), "[]"])
    assert ValidationReport.model_validate_json(report.model_dump_json()) == report


# --- import boundary: the module must stay importable on the API host without heavy deps --------


def test_module_imports_no_heavy_dependencies() -> None:
    code = (
        "import sys, contracts.data_formats\n"
        "bad = {'torch', 'transformers', 'trl', 'sqlalchemy', 'fastapi', 'datasets'} & set(sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
