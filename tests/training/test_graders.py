"""Graders of sampled replies (worker/training/graders.py, shapes in contracts/graders.py): the metrics of
text_similarity on known inputs, the score parser, and score_model against a real OpenAI-compatible HTTP
server on loopback (deterministic replies), including an endpoint that fails or is not there."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from pydantic import ValidationError

from contracts.graders import ScoreModelGrader, StringCheckGrader, TextSimilarityGrader, render_template
from contracts.method import Samples
from ipo_cli.processes import free_port
from worker.training.graders import GraderEndpoint, Graders, parse_score, string_check, text_similarity


def _similarity(metric: str, reply: str, reference: str) -> float | None:
    grader = TextSimilarityGrader.model_validate({"type": "text_similarity", "evaluation_metric": metric})
    return text_similarity(grader, reply, reference).value


def test_string_check() -> None:
    eq = StringCheckGrader(type="string_check", operation="eq")
    assert string_check(eq, "The sum is 7.", "The sum is 7.") == 1.0 and string_check(eq, "the sum", "The sum") == 0.0
    assert string_check(StringCheckGrader(type="string_check", operation="ne"), "a", "b") == 1.0
    like = StringCheckGrader(type="string_check", operation="like")
    assert (
        string_check(like, "Well, The sum is 7. Yes", "The sum is 7.") == 1.0 and string_check(like, "the", "The") == 0
    )
    assert (
        string_check(StringCheckGrader(type="string_check", operation="ilike"), "THE SUM IS 7.", "the sum is 7.") == 1
    )


@pytest.mark.parametrize(
    "metric", ["fuzzy_match", "bleu", "gleu", "rouge_1", "rouge_2", "rouge_3", "rouge_5", "rouge_l"]
)
def test_identical_texts_score_one_and_disjoint_texts_zero(metric: str) -> None:
    text = "the cat sat on the mat in the sun today"
    assert _similarity(metric, text, text) == pytest.approx(1.0)
    if metric != "fuzzy_match":  # characters are shared; words are not
        assert _similarity(metric, "zebra quantum violin", text) == pytest.approx(0.0, abs=0.05)


def test_similarity_values() -> None:
    reply, reference = "the cat sat on the mat", "the cat lay on the mat"
    # ROUGE-1 F: 5 of 6 unigrams shared both ways -> 5/6; ROUGE-2: bigrams shared 3 of 5 -> 0.6
    assert _similarity("rouge_1", reply, reference) == pytest.approx(5 / 6, abs=1e-6)
    assert _similarity("rouge_2", reply, reference) == pytest.approx(0.6, abs=1e-6)
    assert _similarity("rouge_l", reply, reference) == pytest.approx(5 / 6, abs=1e-6)  # LCS of 5 words
    # GLEU: min(precision, recall) over 1..4-grams: (5 + 3 + 1 + 0) matches of (6 + 5 + 4 + 3) = 9 / 18
    assert _similarity("gleu", reply, reference) == pytest.approx(0.5, abs=1e-6)
    bleu = _similarity("bleu", reply, reference)
    assert bleu is not None and 0.0 < bleu < _similarity("rouge_1", reply, reference)  # type: ignore[operator]
    assert _similarity("fuzzy_match", "abcx", "abcd") == pytest.approx(0.75)


@pytest.mark.parametrize(
    ("reply", "low", "high", "value"),
    [
        ("0.8", 0, 1, 0.8),
        ("Score: 7", 0, 10, 7.0),
        ('```json\n{"score": 0.25, "reason": "2 of 8 facts"}\n```', 0, 1, 0.25),
        ('{"steps": [], "result": 3}', 1, 5, 3.0),
        ("I'd give it 7/10.", 0, 1, 0.7),
        ("3 out of 5", 0, 10, 6.0),
        ("15", 0, 10, 10.0),  # clamped
        ("-2", 0, 1, 0.0),
        (".5", 0, 1, 0.5),
    ],
)
def test_parse_score(reply: str, low: float, high: float, value: float) -> None:
    assert parse_score(reply, low, high).value == pytest.approx(value)


def test_unparsable_scores_are_null_with_a_reason() -> None:
    for reply in ("", "excellent answer", "inf", "1/0 nonsense"):
        score = parse_score(reply, 0, 1)
        assert score.value is None and score.reason and "no score in the grader's reply" in score.reason
    clamped = parse_score("15", 0, 10)
    assert clamped.reason == "15 clamped to [0, 10]"


def test_render_template() -> None:
    values = {"sample.output_text": "{{item.chosen}}", "item.chosen": "C"}
    # placeholders with spaces; substituted text is not scanned again; unknown names stay as written
    assert (
        render_template("a {{ sample.output_text }} b {{item.chosen}} {{x.y}}", values)
        == "a {{item.chosen}} b C {{x.y}}"
    )


GRADER = {
    "type": "score_model",
    "name": "judge",
    "model": "judge-model",
    "input": [
        {"role": "system", "content": "Rate the reply from 1 to 10."},
        {
            "role": "user",
            "content": "Question: {{item.prompt}}\nReference: {{item.chosen}}\nReply: {{sample.output_text}}",
        },
    ],
    "range": [1, 10],
    "sampling_params": {"temperature": 0, "seed": 3, "max_completions_tokens": 16},
}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"input": [{"role": "user", "content": "{{sample.output_text}} {{item.answer}}"}]}, "{{item.answer}}"),
        ({"input": [{"role": "user", "content": "no reply here"}]}, "{{sample.output_text}}"),
        ({"input": [{"role": "tool", "content": "{{sample.output_text}}"}]}, "role"),
        ({"range": [1, 1]}, "range"),
        ({"sampling_params": {"temperature": 0, "top_k": 3}}, "top_k"),
        ({"base_url": "http://elsewhere"}, "base_url"),  # the endpoint is the worker's setting, never the job's
    ],
)
def test_bad_score_model_graders_are_refused(change: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        ScoreModelGrader.model_validate({**GRADER, **change})
    assert field in str(info.value)


@pytest.mark.parametrize("metric", ["meteor", "cosine"])
def test_unavailable_metrics_are_refused_with_the_reason(metric: str) -> None:
    with pytest.raises(ValidationError) as info:
        Samples.model_validate({"graders": [{"type": "text_similarity", "evaluation_metric": metric}]})
    error = info.value.errors()[0]
    assert error["loc"][-1] == "evaluation_metric" and f"{metric} is not available here" in error["msg"]


class _Judge(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat completions endpoint whose reply depends on the graded reply (the text after
    ``Reply: ``): ``good`` -> "Score: 9", ``json`` -> a fenced JSON score of 12 (out of range), ``boom`` -> 500,
    anything else -> no number. Requests are recorded on the server."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})  # type: ignore[attr-defined]
        reply = body["messages"][-1]["content"].rsplit("Reply: ", 1)[-1]
        if "boom" in reply:
            self.send_response(500)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "judge exploded", "type": "server_error"}}')
            return
        text = {"good": "Score: 9", "json": '```json\n{"score": 12}\n```'}.get(reply, "I cannot rate this.")
        payload = {
            "id": "c1",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        }
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def judge() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    server.requests = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


ITEMS = [{"prompt": f"Q{i}", "chosen": f"C{i}", "rejected": f"R{i}"} for i in range(4)]


def test_score_model_against_a_real_endpoint(judge: ThreadingHTTPServer) -> None:
    grader = ScoreModelGrader.model_validate(GRADER)
    endpoint = GraderEndpoint(f"http://127.0.0.1:{judge.server_port}/v1", "grader-key", 10)
    graders = Graders([grader, TextSimilarityGrader(type="text_similarity", evaluation_metric="rouge_1")], endpoint)
    assert graders.startup_warning() is None
    scores, reasons, warnings = graders.score(["good", "json", "meh", "C3"], ITEMS)
    assert [s["judge"] for s in scores] == [9.0, 10.0, None, None]
    assert reasons[1]["judge"] == "12 clamped to [1, 10]" and "no score in the grader's reply" in reasons[2]["judge"]
    assert [s["text_similarity"] for s in scores] == [0.0, 0.0, 0.0, 1.0] and not warnings
    first = judge.requests[0]  # type: ignore[attr-defined]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer grader-key"
    assert first["model"] == "judge-model" and first["temperature"] == 0 and first["seed"] == 3
    assert first["max_completion_tokens"] == 16  # OpenAI's sampling_params spelling, sent as the API's field
    assert first["messages"][0] == {"role": "system", "content": "Rate the reply from 1 to 10."}
    assert first["messages"][1]["content"] == "Question: Q0\nReference: C0\nReply: good"


def test_a_failing_endpoint_is_a_warning_and_null_scores(judge: ThreadingHTTPServer) -> None:
    grader = ScoreModelGrader.model_validate(GRADER)
    graders = Graders([grader], GraderEndpoint(f"http://127.0.0.1:{judge.server_port}/v1", None, 10))
    scores, reasons, warnings = graders.score(["good", "boom", "good", "good"], ITEMS)
    # the first is scored; the 500 (retried once by the client) stops the round: the rest are null, one warning
    assert [s["judge"] for s in scores] == [9.0, None, None, None]
    assert "answered 500" in reasons[1]["judge"] and reasons[3]["judge"] == reasons[1]["judge"]
    assert len(warnings) == 1 and "grader judge" in warnings[0] and "judge exploded" in warnings[0]
    assert len(judge.requests) == 1 + 2  # type: ignore[attr-defined]

    down = Graders([grader], GraderEndpoint(f"http://127.0.0.1:{free_port()}/v1", None, 5))
    scores, reasons, warnings = down.score(["good", "good"], ITEMS[:2])
    assert [s["judge"] for s in scores] == [None, None] and len(warnings) == 1
    assert "unavailable" in reasons[0]["judge"]


def test_no_endpoint_configured() -> None:
    graders = Graders([ScoreModelGrader.model_validate(GRADER)], None)
    warning = graders.startup_warning()
    assert warning and "IPO_GRADER_BASE_URL" in warning
    scores, reasons, warnings = graders.score(["good"], ITEMS[:1])
    assert scores == [{"judge": None}] and "IPO_GRADER_BASE_URL" in reasons[0]["judge"] and not warnings
