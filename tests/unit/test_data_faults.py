"""Faults found with real preference files, each as a class (issue 12, section 3): nothing silently dropped
or reshaped, foreign shapes and whole-file mistakes named once, what TRL and OpenAI accept accepted, text
rows with chat markup never templated twice. The field-case rows are copied here (from the shared field
cases: LLaMA-Factory, Anthropic HH, OpenAI tool calls, axolotl, PowerShell), plus cases beyond them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from contracts.data_formats import FILE_LEVEL, ValidationReport, parse_preference_file, parse_preference_lines
from contracts.text_rows import find_markup

# --- field-case rows, copied -------------------------------------------------------------------------------

LLAMAFACTORY = [
    {
        "conversations": [{"from": "human", "value": "How can I best prepare for a job interview?"}],
        "chosen": {
            "from": "gpt",
            "value": "Research the company, practise common questions, and prepare questions of your own.",
        },
        "rejected": {"from": "gpt", "value": "Just show up."},
    },
    {
        "conversations": [
            {"from": "system", "value": "You are a teacher who explains tasks in simple steps."},
            {"from": "human", "value": "What part of speech is the word 'quickly'?"},
        ],
        "chosen": {"from": "gpt", "value": "It is an adverb: it describes how an action is done."},
        "rejected": {"from": "gpt", "value": "It is a noun."},
    },
    {
        "conversations": [
            {"from": "human", "value": "Who wrote Pride and Prejudice?"},
            {"from": "gpt", "value": "Jane Austen."},
            {"from": "human", "value": "Name one theme of the novel."},
        ],
        "chosen": {"from": "gpt", "value": "Marriage as a social and economic institution."},
        "rejected": {"from": "gpt", "value": "Space travel."},
    },
]
HH_SPLIT = [
    {
        "prompt": "\n\nHuman: What is a good name for a cat?\n\nAssistant: Whiskers is a classic.\n\nHuman: "
        "Another one?\n\nAssistant:",
        "chosen": " How about Miso?",
        "rejected": " I don't care about cats.",
    },
    {
        "prompt": "\n\nHuman: How do I boil an egg?\n\nAssistant:",
        "chosen": " Simmer it for about nine minutes, then cool it in cold water.",
        "rejected": " Put it in the microwave.",
    },
]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
TOOL_CALL_ONLY_DIFFERENCE = {
    "input": {"messages": [{"role": "user", "content": "Weather in Oslo?"}], "tools": [WEATHER_TOOL]},
    "preferred_output": [{"role": "assistant", "content": "Let me check.", "tool_calls": [CALL]}],
    "non_preferred_output": [{"role": "assistant", "content": "Let me check. "}],
}
TOOL_CALL_IN_HISTORY = {
    "input": {
        "messages": [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": "", "tool_calls": [CALL]},
            {"role": "user", "content": "(tool result) -3 C, snow. Summarise it for me."},
        ],
        "tools": [WEATHER_TOOL],
    },
    "preferred_output": [{"role": "assistant", "content": "It is -3 C and snowing in Oslo."}],
    "non_preferred_output": [{"role": "assistant", "content": "It is warm."}],
}
TOOL_ROLE = {
    "input": {
        "messages": [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "call_1", "content": "-3 C, snow"},
        ],
        "tools": [WEATHER_TOOL],
    },
    "preferred_output": [{"role": "assistant", "content": "It is -3 C and snowing in Oslo."}],
    "non_preferred_output": [{"role": "assistant", "content": "It is warm."}],
}
AXOLOTL_SYSTEM = [
    {
        "system": "You are a pirate. Always answer in pirate speak.",
        "prompt": "Where is the treasure?",
        "chosen": "Arr, buried under the old palm, matey!",
        "rejected": "It is under the palm tree.",
    },
    {
        "system": "Answer only with a number.",
        "prompt": "How many legs does a spider have?",
        "chosen": "8",
        "rejected": "Spiders have eight legs.",
    },
]
POWERSHELL_ROWS = (
    '{"prompt": "Is ice cold?", "chosen": "Yes.", "rejected": "No."}\r\n'
    '{"prompt": "Is fire hot?", "chosen": "Yes.", "rejected": "No."}\r\n'
)
PLAIN = {"prompt": "What is 2+2?", "chosen": "4.", "rejected": "5."}


def write_jsonl(tmp_path: Path, rows: Sequence[object], name: str = "train.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def file_error(report: ValidationReport) -> str:
    assert not report.ok and report.error_count == 1, report.errors
    assert report.errors[0].line == FILE_LEVEL
    return report.errors[0].reason


def one_reason(rows: list[object]) -> str:
    _, report = parse_preference_lines([json.dumps(r) for r in rows], min_examples=0)
    assert not report.ok and report.error_count == 1, report.errors
    return report.errors[0].reason


# --- whole-file mistakes: one reason, saying what to do ------------------------------------------------------


def test_a_pretty_printed_json_array_is_one_reason_naming_its_shape(tmp_path: Path) -> None:
    path = tmp_path / "dpo_en_demo.json.jsonl"
    path.write_text(json.dumps(LLAMAFACTORY, indent=2), encoding="utf-8")
    examples, report = parse_preference_file(path)
    reason = file_error(report)
    assert examples == [] and "one JSON array" in reason and "not JSON Lines" in reason
    assert "jq -c '.[]'" in reason and "ShareGPT (LLaMA-Factory) preference shape" in reason


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (json.dumps([{"prompt": "a", "chosen": "b", "rejected": "c"}]), "text prompt/chosen/rejected shape"),
        ("\n\n  [\n" + json.dumps({"instruction": "x", "output": "y"}) + "\n]", "Alpaca instruction shape"),
        ("[1, 2]", "not JSON Lines"),
        ("[\n" + "{" * 20, "not JSON Lines"),  # never completes: still one reason
    ],
)
def test_any_json_array_is_one_file_level_reason(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text(content, encoding="utf-8")
    assert expected in file_error(parse_preference_file(path)[1])


def test_a_one_line_array_among_records_later_is_still_a_line_error(tmp_path: Path) -> None:
    _, report = parse_preference_file(write_jsonl(tmp_path, [PLAIN, [PLAIN]]))
    assert [(e.line, e.reason) for e in report.errors] == [(2, "expected a JSON object, got array")]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"\xff\xfe" + POWERSHELL_ROWS.encode("utf-16-le"), "UTF-16 encoded"),  # the field case's bytes
        (b"\xfe\xff" + POWERSHELL_ROWS.encode("utf-16-be"), "UTF-16 encoded"),
        (POWERSHELL_ROWS.encode("utf-16-le"), "NUL bytes"),  # no byte-order mark
        (b"\xff\xfe\x00\x00" + POWERSHELL_ROWS.encode("utf-32-le"), "UTF-32 encoded"),
    ],
)
def test_utf16_and_utf32_files_are_one_reason_saying_save_as_utf8(tmp_path: Path, data: bytes, expected: str) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(data)
    reason = file_error(parse_preference_file(path)[1])
    assert expected in reason and "save it as UTF-8" in reason and "Set-Content -Encoding utf8" in reason


# --- foreign shapes: converted or named ------------------------------------------------------------------------


def test_llamafactory_sharegpt_rows_are_converted(tmp_path: Path) -> None:
    examples, report = parse_preference_file(write_jsonl(tmp_path, LLAMAFACTORY))
    assert report.ok and report.format == "sharegpt" and report.n_examples == 3, report.errors
    assert examples[1].prompt == [
        {"role": "system", "content": "You are a teacher who explains tasks in simple steps."},
        {"role": "user", "content": "What part of speech is the word 'quickly'?"},
    ]
    assert [m["role"] for m in examples[2].prompt] == ["user", "assistant", "user"]
    assert examples[0].chosen == [{"role": "assistant", "content": LLAMAFACTORY[0]["chosen"]["value"]}]  # type: ignore[index]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"chosen": {"from": "function_call", "value": "{}"}}, 'tool calls are not supported (a "function_call" turn)'),
        (
            {"conversations": [{"from": "observation", "value": "{}"}, {"from": "human", "value": "x"}]},
            'tool calls are not supported (a "observation" turn)',
        ),
        ({"chosen": {"from": "bard", "value": "x"}}, 'from "bard" is not one of human, gpt, system'),
        ({"chosen": {"role": "assistant", "content": "x"}}, 'must be an object with "from" and "value"'),
        ({"tools": '[{"name": "f"}]'}, '"tools": tool definitions are not supported'),
    ],
)
def test_sharegpt_content_that_cannot_be_trained_is_refused(change: dict[str, object], reason: str) -> None:
    assert reason in one_reason([{**LLAMAFACTORY[0], **change}])


@pytest.mark.parametrize(
    ("record", "named"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "supervised fine-tuning shape"),
        ({"conversations": [{"from": "human", "value": "x"}]}, "a ShareGPT conversation"),
        ({"prompt": "x", "completion": "y", "label": True}, "unpaired preference (KTO)"),
        ({"prompt": "x", "completion": "y"}, "prompt-completion"),
        ({"instruction": "x", "input": "", "output": "y"}, "Alpaca instruction shape"),
        ({"question": "x", "response_j": "y", "response_k": "z"}, "StackExchange-paired"),
        ({"system": "s", "question": "x", "chosen": "y", "rejected": "z"}, 'rename "question" to "prompt"'),
        ({"text": "x"}, "plain text"),
    ],
)
def test_foreign_shapes_are_named(record: dict[str, object], named: str) -> None:
    reason = one_reason([record])
    assert reason.startswith("unknown shape: this looks like") and named in reason


def test_sharegpt_turns_inside_a_message_list_are_named() -> None:
    record = {"prompt": [{"from": "human", "value": "x"}], "chosen": [{"from": "gpt", "value": "y"}], "rejected": []}
    assert '"from"/"value" keys (ShareGPT turns)' in one_reason([record])


# --- tool calls and other content: used, or the line refused with the reason ----------------------------------


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (TOOL_CALL_ONLY_DIFFERENCE, "preferred_output message 1: tool calls are not supported (it carries tool_calls)"),
        (TOOL_CALL_IN_HISTORY, "input.messages message 2: tool calls are not supported (it carries tool_calls)"),
        (TOOL_ROLE, "input.messages message 2: tool calls are not supported"),
    ],
)
def test_openai_tool_call_rows_are_refused_as_tool_calls(record: dict[str, object], reason: str) -> None:
    got = one_reason([record])
    assert got == reason or got.startswith(reason)
    assert "identical" not in got and "content must be" not in got


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ({"role": "tool", "content": "-3 C"}, 'tool calls are not supported (a "tool" turn carries a tool result)'),
        ({"role": "function", "content": "{}"}, 'a "function" turn'),
        ({"role": "user", "content": "x", "function_call": {"name": "f"}}, "it carries function_call"),
        ({"role": "user", "content": "x", "name": "alice"}, 'key "name" is not used in training'),
        ({"role": "user", "content": "x", "weight": 0}, 'key "weight" is not used in training'),
        ({"role": "user", "content": "x", "reasoning_content": "hmm"}, 'key "reasoning_content"'),
        ({"role": "user", "content": "x", "refusal": "no"}, 'key "refusal" is not used in training'),
        ({"role": "user", "content": None}, "content must be a string or a list of text parts (got null)"),
        ({"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}, 'part 1 is "input_audio"'),
        ({"role": "user", "content": ["x"]}, "content part 1 is string: only text parts"),
    ],
)
def test_message_content_is_never_dropped(message: dict[str, object], reason: str) -> None:
    record = {"prompt": [message, {"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}]}
    record["rejected"] = [{"role": "assistant", "content": "b"}]
    assert reason in one_reason([record])


def test_bookkeeping_and_empty_keys_are_not_content() -> None:
    user: dict[str, object] = {
        "role": "user",
        "content": "q",
        "id": "m1",
        "name": None,
        "tool_calls": [],
        "refusal": None,
    }
    record = {"prompt": [user], "chosen": [{"role": "assistant", "content": "a", "annotations": []}]}
    record["rejected"] = [{"role": "assistant", "content": "b", "metadata": {"source": "x"}}]
    examples, report = parse_preference_lines([json.dumps(record)])
    assert report.ok and examples[0].prompt == [{"role": "user", "content": "q"}]


def test_text_content_parts_are_accepted_as_openai_does() -> None:
    parts = [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}]
    record = {
        "input": {"messages": [{"role": "user", "content": parts}]},
        "preferred_output": [{"role": "assistant", "content": [{"type": "text", "text": "4."}]}],
        "non_preferred_output": [{"role": "assistant", "content": "5."}],
    }
    examples, report = parse_preference_lines([json.dumps(record)])
    assert report.ok, report.errors
    assert examples[0].prompt == [{"role": "user", "content": "What is 2+2?"}]
    assert examples[0].chosen == [{"role": "assistant", "content": "4."}]


def test_axolotl_system_field_becomes_the_system_message(tmp_path: Path) -> None:
    examples, report = parse_preference_file(write_jsonl(tmp_path, AXOLOTL_SYSTEM))
    assert report.ok and report.text_mode == "chat_template", report.errors
    assert examples[0].prompt == [
        {"role": "system", "content": "You are a pirate. Always answer in pirate speak."},
        {"role": "user", "content": "Where is the treasure?"},
    ]
    assert examples[1].system == "Answer only with a number."


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (
            {
                "system": "Be terse.",
                "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "q"}],
                "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}],
            },
            "both a top-level system field and a system message",
        ),
        ({**PLAIN, "system": ["x"]}, "system must be a string (got array)"),
        ({**PLAIN, "images": ["a.png"]}, '"images": images are not supported'),
        ({**PLAIN, "history": [["q", "a"]]}, '"history" field'),
        ({**PLAIN, "tools": [WEATHER_TOOL]}, '"tools": tool definitions are not supported'),
    ],
)
def test_top_level_content_is_used_or_refused(record: dict[str, object], reason: str) -> None:
    assert reason in one_reason([record])


def test_a_system_field_applies_to_conversational_and_openai_rows_too() -> None:
    record = {
        "system": "Be terse.",
        "input": {"messages": [{"role": "user", "content": "q"}]},
        "preferred_output": [{"role": "assistant", "content": "a"}],
        "non_preferred_output": [{"role": "assistant", "content": "b"}],
    }
    examples, report = parse_preference_lines([json.dumps(record)])
    assert report.ok and examples[0].prompt[0] == {"role": "system", "content": "Be terse."}


# --- text rows: templated when plain, verbatim when they carry markup, recorded either way ----------------------


def test_hh_split_transcripts_are_used_verbatim_not_templated(tmp_path: Path) -> None:
    examples, report = parse_preference_file(write_jsonl(tmp_path, HH_SPLIT))
    assert report.ok and report.text_mode == "verbatim"
    assert all(ex.verbatim for ex in examples)
    assert examples[0].text == (HH_SPLIT[0]["prompt"], " How about Miso?", " I don't care about cats.")
    assert report.text_rows is not None and "used verbatim" in report.text_rows and "Anthropic HH" in report.text_rows
    assert "used verbatim" in report.summary()


def test_raw_hh_rows_with_an_implicit_text_prompt_are_split_like_trl() -> None:
    rows = [
        {
            "chosen": "\n\nHuman: Name a cat.\n\nAssistant: Miso.",
            "rejected": "\n\nHuman: Name a cat.\n\nAssistant: No.",
        },
        {"chosen": "Q: 2+2? A: four", "rejected": "Q: 2+2? A: seven"},
    ]
    examples, report = parse_preference_lines([json.dumps(r) for r in rows])
    assert report.ok and report.format == "text_implicit_prompt" and report.text_mode == "verbatim", report.errors
    assert examples[0].text == ("\n\nHuman: Name a cat.\n\nAssistant:", " Miso.", " No.")  # TRL's extract_prompt
    assert examples[1].text == ("Q: 2+2? A:", " four", " seven") and examples[1].verbatim


@pytest.mark.parametrize(
    "text",
    [
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
        "[INST] hi [/INST]",
        "<start_of_turn>user\nhi<end_of_turn>",
        "<|user|>\nhi</s>\n<|assistant|>\n",
        "### Instruction:\nhi\n\n### Response:\n",
        "Human: hi\n\nAssistant:",
    ],
)
def test_common_template_markers_make_text_rows_verbatim(text: str) -> None:
    rows = [
        {"prompt": text, "chosen": "a", "rejected": "b"},
        {"prompt": text + " again", "chosen": "c", "rejected": "d"},
    ]
    examples, report = parse_preference_lines([json.dumps(r) for r in rows])
    assert report.ok and report.text_mode == "verbatim"
    assert [ex.verbatim for ex in examples] == [True, True]  # one mode per file
    assert report.text_rows is not None and "(line 1:" in report.text_rows


def test_a_marked_row_among_plain_ones_is_refused_not_templated_twice() -> None:
    marked = {"prompt": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "chosen": "a", "rejected": "b"}
    examples, report = parse_preference_lines([json.dumps(r) for r in (PLAIN, marked, PLAIN)])
    assert not report.ok and [e.line for e in report.errors] == [2]
    reason = report.errors[0].reason
    assert "carries the ChatML marker '<|im_start|>'" in reason and "other text rows are plain (line 1)" in reason
    assert [ex.line for ex in examples] == [1, 3] and not any(ex.verbatim for ex in examples)
    assert report.text_mode == "chat_template"


def test_the_models_special_tokens_make_text_rows_verbatim() -> None:
    row = json.dumps({"prompt": "<bos>hi<sep>", "chosen": "a", "rejected": "b"})
    assert parse_preference_lines([row])[1].text_mode == "chat_template"
    _, report = parse_preference_lines([row], special_tokens=("<bos>", "<sep>"))
    assert report.text_mode == "verbatim" and "special token '<bos>'" in (report.text_rows or "")


def test_plain_text_mentioning_humans_is_not_a_transcript() -> None:
    assert find_markup(["Human: is a word", "The Assistant: a role"]) is None  # not at a turn boundary
    assert find_markup(["a\n\nHuman: b"]) is not None


def test_a_system_field_cannot_be_placed_into_verbatim_text() -> None:
    rows = [HH_SPLIT[0], {**HH_SPLIT[1], "system": "Be kind."}]
    examples, report = parse_preference_lines([json.dumps(r) for r in rows])
    assert not report.ok and [e.line for e in report.errors] == [2]
    assert "system field cannot be combined with text rows used verbatim" in report.errors[0].reason
    assert [ex.line for ex in examples] == [1] and report.n_examples == 1


def test_a_huge_pretty_printed_array_is_read_only_so_far(tmp_path: Path) -> None:
    record = {"conversations": [{"from": "human", "value": "q " * 20}] * 20000, "chosen": {}, "rejected": {}}
    path = tmp_path / "big.json"
    path.write_text(json.dumps([record, record], indent=2), encoding="utf-8")  # ~14 MB, first record ~7 MB
    reason = file_error(parse_preference_file(path)[1])
    assert "one JSON array" in reason and "Its records" not in reason  # the first record is past the peek


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (__import__("gzip").compress(POWERSHELL_ROWS.encode()), "gzip-compressed: decompress it first"),
        (b"PAR1" + bytes(range(256)) * 8000, "a Parquet file (as Hugging Face datasets ship)"),  # > 1 MiB, no newline
        (b"PK\x03\x04" + b"\x00" * 64, "a ZIP archive"),
        (__import__("bz2").compress(POWERSHELL_ROWS.encode()), "bzip2-compressed"),
        (b'"prompt","chosen","rejected"\n"a","b","c"\n', "the file is CSV with a header (prompt, chosen, rejected)"),
        (b"id\tprompt\tchosen\trejected\n1\ta\tb\tc\n", "the file is TSV with a header (id, prompt, chosen, rejected)"),
    ],
)
def test_binary_and_csv_files_are_one_reason_saying_what_to_do(tmp_path: Path, data: bytes, expected: str) -> None:
    path = tmp_path / "upload.jsonl"
    path.write_bytes(data)
    reason = file_error(parse_preference_file(path)[1])
    assert expected in reason and "not JSON Lines" in reason


def test_a_text_line_that_merely_mentions_chosen_is_not_a_csv_header() -> None:
    _, report = parse_preference_lines(["chosen or rejected, who knows", json.dumps(PLAIN)])
    assert [e.line for e in report.errors] == [1] and report.errors[0].reason.startswith("malformed JSON")
