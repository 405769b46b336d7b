"""Hostile and malformed input: every case is a clear 4xx in OpenAI's ``{"error": {...}}`` shape and
leaves no partial rows (files, jobs) or stored blobs behind."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.models import Job, StoredFile
from app.settings import Settings
from tests.api.conftest import pref_line

BOUNDARY = "ipo-test-boundary"


def _counts(client: TestClient, settings: Settings) -> tuple[int, int, int]:
    with client.app.state.ctx.sessions() as session:  # type: ignore[attr-defined]
        files = session.scalar(select(func.count()).select_from(StoredFile)) or 0
        jobs = session.scalar(select(func.count()).select_from(Job)) or 0
    store = settings.var_dir / "storage"
    blobs = len([p for p in store.rglob("*") if p.is_file()]) if store.exists() else 0
    return files, jobs, blobs


@pytest.fixture
def unchanged(client: TestClient, settings: Settings) -> Iterator[None]:
    """The test body must leave the files/jobs tables and the store exactly as they were."""
    before = _counts(client, settings)
    yield
    assert _counts(client, settings) == before


def _error(r, status: int, param: str | None = None) -> dict[str, object]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if param is not None:
        assert err["param"] == param, err
    return err


def _multipart(content: bytes, filename: str = "train.jsonl") -> bytes:
    return (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + content
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


MULTIPART = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


def test_oversized_upload_with_content_length(upload, unchanged) -> None:
    err = _error(upload(content=b"x" * 300_000), 413, "file")
    assert err["code"] == "file_too_large" and "200000" in str(err["message"])


def test_oversized_chunked_upload_is_refused_while_streaming(client, auth, unchanged) -> None:
    # (TestClient buffers the request; tests/sdk checks the same over a real socket against uvicorn.)
    body = _multipart(b"x" * 1_000_000)

    def chunks() -> Iterator[bytes]:  # no Content-Length: Transfer-Encoding: chunked
        for i in range(0, len(body), 16_384):
            yield body[i : i + 16_384]

    r = client.post("/v1/files", headers={**auth, **MULTIPART}, content=chunks())
    _error(r, 413, "file")
    assert "content-length" not in {k.lower() for k in r.request.headers}


def test_exactly_at_the_limit_is_accepted(upload, settings) -> None:
    line = pref_line(1).encode() + b"\n"
    content = line * (settings.max_upload_bytes // len(line))
    assert upload(content=content).status_code == 200


def test_oversized_json_body(client, auth, unchanged) -> None:
    body = {"model": "tiny-mistral", "training_file": "file-x", "metadata": {"k": "v" * 100}, "pad": "x" * 2_000_000}
    err = _error(client.post("/v1/fine_tuning/jobs", headers=auth, json=body), 413)
    assert err["code"] == "request_too_large"


def test_truncated_multipart(client, auth, unchanged) -> None:
    body = _multipart(pref_line(1).encode() * 10)
    r = client.post("/v1/files", headers={**auth, **MULTIPART}, content=body[: len(body) // 2])
    assert 400 <= r.status_code < 500
    _error(r, r.status_code)


def test_missing_file_field_and_wrong_purpose(client, auth, good_jsonl, unchanged) -> None:
    _error(client.post("/v1/files", headers=auth, data={"purpose": "fine-tune"}), 400, "file")
    r = client.post("/v1/files", headers=auth, files={"file": ("t.jsonl", good_jsonl)}, data={"purpose": "batch"})
    _error(r, 400, "purpose")
    r = client.post("/v1/files", headers=auth, json={"purpose": "fine-tune"})
    _error(r, 400)


def test_non_utf8_file_is_stored_with_an_error_naming_the_line(upload) -> None:
    content = (pref_line(1) + "\n").encode() + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'
    body = upload(content=content).json()
    assert body["status"] == "error" and "line 2" in body["status_details"] and "UTF-8" in body["status_details"]


def test_long_single_line(upload) -> None:
    long_valid = json.dumps({"prompt": "p" * 150_000, "chosen": "yes", "rejected": "no"}).encode()
    assert upload(content=long_valid).json()["status"] == "processed"
    garbage = upload(content=b"x" * 190_000).json()
    assert garbage["status"] == "error" and "line 1" in garbage["status_details"]
    assert len(garbage["status_details"]) < 4001


def test_json_bombs(client, auth, upload, unchanged) -> None:
    deep = '{"model": "tiny-mistral", "training_file": "file-x", "hyperparameters": ' + "[" * 100_000 + "]" * 100_000
    headers = {**auth, "Content-Type": "application/json"}
    err = _error(client.post("/v1/fine_tuning/jobs", headers=headers, content=deep + "}"), 400)
    assert "parse" in str(err["message"]) or "nested" in str(err["message"])
    nested: object = 1
    for _ in range(20):
        nested = [nested]
    medium = {"model": "tiny-mistral", "training_file": "file-x", "hyperparameters": {"a": nested}}
    err = _error(client.post("/v1/fine_tuning/jobs", headers=auth, json=medium), 400)
    assert "nested deeper" in str(err["message"])


def test_json_bomb_in_a_file(upload) -> None:
    body = upload(content=b"[" * 100_000 + b"\n").json()
    assert body["status"] == "error" and "one JSON array" in body["status_details"]  # a file-level reason, no crash


def test_unknown_fields_wrong_types_and_nul(client, auth, upload, unchanged) -> None:
    cases = [
        ({"model": "tiny-mistral", "training_file": "file-x", "surprise": 1}, "surprise"),
        ({"model": "tiny-mistral", "training_file": 12}, "training_file"),
        ({"model": ["tiny-mistral"], "training_file": "file-x"}, "model"),
        ({"model": "tiny-mistral", "training_file": "file-x", "seed": "seven"}, "seed"),
        ({"model": "tiny-mistral", "training_file": "file-x", "seed": 2**40}, "seed"),
        ({"model": "tiny-mistral", "training_file": "file-x", "metadata": {"k": 1}}, "metadata.k"),
        ({"model": "tiny-mistral", "training_file": "file-x", "metadata": "k=v"}, "metadata"),
        ({"model": "tiny-mistral", "training_file": "file\x00x"}, None),
        ({"model": "tiny-mistral", "training_file": "../../etc/passwd"}, "training_file"),
        ({"training_file": "file-x"}, "model"),
    ]
    for body, param in cases:
        _error(client.post("/v1/fine_tuning/jobs", headers=auth, json=body), 400, param)
    # A misspelled field: the required one is reported missing, and the typo is named beside it.
    typo = _error(client.post("/v1/fine_tuning/jobs", headers=auth, json={"model": "m", "training_fil": "f"}), 400)
    assert typo["param"] == "training_file"
    assert "training_fil: Extra inputs are not permitted" in str(typo["message"]), typo
    lora = {"lora": {"target_modules": ["q\x00"]}}
    nul = {"model": "tiny-mistral", "training_file": "file-x", "method": {"type": "ipo", "ipo": lora}}
    assert "NUL" in str(_error(client.post("/v1/fine_tuning/jobs", headers=auth, json=nul), 400)["message"])
    # graders of the samples block: the field named (with the grader's type), and why a metric is not offered
    judge = {"type": "score_model", "model": "m", "input": [{"role": "user", "content": "{{sample.output_text}}"}]}
    graders = [
        (
            {"type": "text_similarity", "evaluation_metric": "meteor"},
            "graders.0.text_similarity.evaluation_metric",
            "WordNet",
        ),
        (
            {"type": "text_similarity", "evaluation_metric": "cosine"},
            "graders.0.text_similarity.evaluation_metric",
            "embeddings",
        ),
        (
            {"type": "text_similarity", "evaluation_metric": "rouge_9"},
            "graders.0.text_similarity.evaluation_metric",
            "rouge_l",
        ),
        (
            {**judge, "input": [{"role": "user", "content": "{{item.answer}}"}]},
            "graders.0.score_model.input.0.content",
            "item.answer",
        ),
        ({**judge, "range": [5, 1]}, "graders.0.score_model.range", "low < high"),
        ({**judge, "api_key": "sk-x"}, "graders.0.score_model.api_key", "xtra"),
    ]
    for grader, field, needle in graders:
        samples = {"graders": [grader]}
        body = {
            "model": "tiny-mistral",
            "training_file": "file-x",
            "method": {"type": "ipo", "ipo": {"samples": samples}},
        }
        err = _error(client.post("/v1/fine_tuning/jobs", headers=auth, json=body), 400, f"method.ipo.samples.{field}")
        assert needle in str(err["message"]), err
    body = {
        "model": "tiny-mistral",
        "training_file": "file-x",
        "method": {"type": "ipo", "ipo": {"samples": {"holdout": 99}}},
    }
    _error(client.post("/v1/fine_tuning/jobs", headers=auth, json=body), 400, "method.ipo.samples.holdout")
    for raw in ("", "null", "[]", '"x"', "{", '{"model": }'):
        r = client.post("/v1/fine_tuning/jobs", headers={**auth, "Content-Type": "application/json"}, content=raw)
        _error(r, 400)


@pytest.mark.parametrize("limit", ["0", "-1", "101", "99999999999999999999", "abc", "1.5"])
def test_bad_limits(client, auth, upload, limit) -> None:
    paths = ["/v1/fine_tuning/jobs", "/v1/fine_tuning/jobs/ftjob-x/events", "/v1/fine_tuning/jobs/ftjob-x/checkpoints"]
    for path in paths:
        _error(client.get(f"{path}?limit={limit}", headers=auth), 400, "limit")
    if limit != "101":  # files allow up to 10000, like OpenAI
        _error(client.get(f"/v1/files?limit={limit}", headers=auth), 400, "limit")
    _error(client.get("/v1/files?limit=10001", headers=auth), 400, "limit")
    _error(client.get("/v1/files?order=sideways", headers=auth), 400, "order")


def test_ids_of_the_wrong_kind_and_malformed_ids(client, auth, upload) -> None:
    file_id = upload().json()["id"]
    job = client.post("/v1/fine_tuning/jobs", headers=auth, json={"model": "tiny-mistral", "training_file": file_id})
    job_id = job.json()["id"]
    for path in (f"/v1/files/{job_id}", f"/v1/fine_tuning/jobs/{file_id}", f"/v1/models/{job_id}", "/v1/files/ftjob-x"):
        _error(client.get(path, headers=auth), 404)
    _error(client.delete(f"/v1/files/{job_id}", headers=auth), 404)
    _error(client.post(f"/v1/fine_tuning/jobs/{file_id}/cancel", headers=auth), 404)
    r = client.post("/v1/fine_tuning/jobs", headers=auth, json={"model": "tiny-mistral", "training_file": job_id})
    _error(r, 404, "training_file")
    for bad in ("file%00x", "%20", "x" * 300):
        _error(client.get(f"/v1/files/{bad}", headers=auth), 400, "file_id")
        _error(client.get(f"/v1/fine_tuning/jobs/{bad}", headers=auth), 400, "job_id")
    _error(client.get("/v1/fine_tuning/jobs?after=ftjob%00", headers=auth), 400, "after")
    _error(client.get(f"/v1/fine_tuning/jobs/{job_id}/events?after=nope", headers=auth), 400, "after")
    _error(client.get("/v1/files?after=file-missing", headers=auth), 400, "after")
    _error(client.get("/v1/files/..%2F..%2Fetc%2Fpasswd", headers=auth), 404)


TRAVERSAL_NAMES = ["../../etc/passwd", "..\\..\\windows\\system.ini", "/abs/path.jsonl", "..", "a\r\nX-Evil: 1.jsonl"]


@pytest.mark.parametrize("name", TRAVERSAL_NAMES)
def test_path_traversal_and_header_injection_in_file_names(client, upload, auth, settings, name) -> None:
    r = upload(name=name)
    assert r.status_code == 200, r.text
    stored = r.json()["filename"]
    assert "/" not in stored and "\\" not in stored and not stored.startswith(".") and "\r" not in stored
    content = client.get(f"/v1/files/{r.json()['id']}/content", headers=auth)
    assert content.status_code == 200 and "\n" not in content.headers["content-disposition"]
    root = (settings.var_dir / "storage").resolve()
    assert all(root in p.resolve().parents for p in root.rglob("*"))


def test_header_injection_in_metadata(client, auth, upload, unchanged) -> None:
    for meta in ({"k": "v\r\nX-Injected: 1"}, {"k\r\nX": "v"}, {"k": "v\x00"}, {"k" * 65: "v"}, {"k": "v" * 513}):
        body = {"model": "tiny-mistral", "training_file": "file-x", "metadata": meta}
        _error(client.post("/v1/fine_tuning/jobs", headers=auth, json=body), 400)


def test_idempotency_key_header_limits(client, auth, upload, unchanged) -> None:
    body = {"model": "tiny-mistral", "training_file": "file-x"}
    _error(client.post("/v1/fine_tuning/jobs", headers={**auth, "Idempotency-Key": "k" * 300}, json=body), 400)


def test_unknown_routes_and_methods(client, auth) -> None:
    _error(client.get("/v1/nothing", headers=auth), 404)
    _error(client.put("/v1/files", headers=auth), 405)
    _error(client.get("/v1/files", headers={"Authorization": "Bearer ipo-sk-\x7f"}), 401)


def test_storage_root_untouched_by_traversal(settings: Settings) -> None:
    assert not (Path("/etc") / "passwd.jsonl").exists()
