"""Property: job creation with odd but well-formed JSON bodies never answers 5xx.

Bodies are built from the request schema's own field names (``JobCreate``, ``contracts.method``) with
values at and past every edge: booleans where numbers go, numbers as strings, integers past 64 bits,
floats like ``-0.0``, ``5e-324``, ``NaN`` and ``Infinity`` (Python's JSON reader takes those), strings
with NUL, lone surrogates (``"\\ud800"``), right-to-left marks and 1,000 characters, nested lists and
objects, unknown keys. Every answer must be a 200 job that reads back, or a 4xx in OpenAI's error shape
with a one-line message. Deterministic (``derandomize``): the same bodies on every machine. The default
suite runs ``EXAMPLES``; ``-m slow`` runs ``EXAMPLES_SLOW``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.main import create_app
from app.settings import Settings
from contracts.method import Hyperparameters, Lora
from tests.api.conftest import RecordingDoorbell

EXAMPLES = 100
EXAMPLES_SLOW = 2000

ODD_TEXT = [
    "",
    " ",
    "auto",
    "AUTO",
    "\x00",
    "\ud800",
    "a\udfffb",
    "\u202etxt",
    "\ufeff",
    "\U0001d532\U0001d52b\U0001d526",
    "0.1",
    "1e3",
    "x" * 1000,
]
ODD_NUMBERS: list[Any] = [
    True, False, 0, -0.0, 1, -1, 0.5, 1.0, 2.0, 16, 100, 101, 4096, 2**31, 2**63, 2**64 + 1, -(2**70), 10**400,
    1e-12, 5e-324, 1e308, float("nan"), float("inf"), float("-inf"),
]  # fmt: skip


def _scalars() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.none(),
        st.sampled_from(ODD_NUMBERS),
        st.sampled_from(ODD_TEXT),
        st.integers(),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=20),
    )


def _odd() -> st.SearchStrategy[Any]:
    return st.recursive(
        _scalars(),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
        max_leaves=6,
    )


EDGE_VALUES: list[Any] = [
    "auto",
    0,
    1,
    2,
    16,
    0.1,
    0.5,
    0.999,
    1.0,
    100,
    101,
    1024,
    1025,
    4096,
    131072,
    1e-6,
    "cosine",
    "nf4",
]
"""Values at the edges of the method's fields: many are valid somewhere, so some bodies get through."""


def _value() -> st.SearchStrategy[Any]:
    return st.one_of(st.sampled_from(EDGE_VALUES), st.sampled_from(EDGE_VALUES), _odd())


def _block(fields: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """An object whose keys are mostly real field names, with edge or odd values (now and then a stray key)."""
    keys = st.sampled_from([*fields, *fields, "unknown_knob"])
    return st.dictionaries(keys, _value(), max_size=3)


def _method() -> st.SearchStrategy[Any]:
    params = st.fixed_dictionaries(
        {},
        optional={
            "hyperparameters": st.one_of(_block(list(Hyperparameters.model_fields)), _odd()),
            "lora": st.one_of(
                _block(list(Lora.model_fields)),
                st.fixed_dictionaries({"target_modules": st.lists(st.sampled_from([*ODD_TEXT, "q_proj"]), max_size=3)}),
            ),
        },
    )
    kind = st.sampled_from(["ipo", "dpo"])
    matching = kind.flatmap(lambda k: st.fixed_dictionaries({"type": st.just(k)}, optional={k: params}))
    odd = st.fixed_dictionaries(
        {"type": st.one_of(st.sampled_from(["ipo", "dpo", "sft", "IPO"]), _odd())},
        optional={"ipo": st.one_of(params, _odd()), "dpo": st.one_of(params, _odd())},
    )
    return st.one_of(matching, matching, odd, _odd())


def _top_level(file_id: str) -> dict[str, st.SearchStrategy[Any]]:
    return {
        "model": st.one_of(st.sampled_from([*ODD_TEXT, "../tiny-mistral", ".", "tiny-mistral/"]), _odd()),
        "training_file": st.one_of(st.sampled_from([*ODD_TEXT, "file-" + "0" * 24]), _odd()),
        "validation_file": st.one_of(st.just(file_id), st.sampled_from(ODD_TEXT), _odd()),
        "suffix": st.one_of(st.sampled_from([*ODD_TEXT, "my-model"]), _odd()),
        "seed": st.one_of(st.sampled_from(ODD_NUMBERS), _odd()),
        "metadata": st.one_of(
            st.dictionaries(st.sampled_from([*ODD_TEXT, "k"]), st.sampled_from(ODD_TEXT), max_size=3), _odd()
        ),
        "method": _method(),
        "hyperparameters": st.one_of(_block(["n_epochs", "batch_size", "learning_rate_multiplier", "beta"]), _odd()),
        "unknown_field": _odd(),
    }


def _bodies(file_id: str) -> st.SearchStrategy[dict[str, Any]]:
    """Half: a valid body with a method from the edges and up to two top-level fields made odd. Half:
    any subset of the fields, each odd (required ones often missing)."""
    fields = _top_level(file_id)
    base = {"model": "tiny-mistral", "training_file": file_id}
    odd_fields = st.sampled_from(sorted(fields)).flatmap(lambda k: fields[k].map(lambda v: {k: v}))
    mostly_valid = st.builds(
        lambda method, odd: base | {"method": method} | odd,
        _method(),
        st.lists(odd_fields, max_size=2).map(lambda parts: {k: v for part in parts for k, v in part.items()}),
    )
    anything = st.fixed_dictionaries({}, optional=fields)
    return st.one_of(mostly_valid, anything)


@pytest.fixture
def fuzz_client(settings: Settings) -> Iterator[TestClient]:
    unlimited = settings.model_copy(update={"max_active_jobs": 0, "rate_limit_per_minute": 0})
    with TestClient(create_app(unlimited, doorbell=RecordingDoorbell()), raise_server_exceptions=False) as client:
        yield client


def _check_job_creation(client: TestClient, auth: dict[str, str], file_id: str, examples: int) -> list[int]:
    statuses: list[int] = []

    @given(body=_bodies(file_id))
    @settings(
        max_examples=examples, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
    )
    def check(body: dict[str, Any]) -> None:
        raw = json.dumps(body, allow_nan=True)  # NaN/Infinity as Python writes them; surrogates as \\ud800
        r = client.post("/v1/fine_tuning/jobs", headers={**auth, "Content-Type": "application/json"}, content=raw)
        statuses.append(r.status_code)
        assert r.status_code < 500, (raw[:2000], r.text)
        if r.status_code == 200:
            job = r.json()
            assert client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=auth).json() == job
            return
        assert 400 <= r.status_code < 500, (raw[:2000], r.status_code, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"] and "\n" not in error["message"], error
        assert error["param"] is None or isinstance(error["param"], str), error

    check()
    return statuses


def test_odd_job_bodies_never_cause_a_server_error(fuzz_client: TestClient, upload, auth) -> None:
    file_id = upload(headers=auth).json()["id"]
    statuses = _check_job_creation(fuzz_client, auth, file_id, EXAMPLES)
    assert len(statuses) >= EXAMPLES and 200 in statuses and 400 in statuses


@pytest.mark.slow
def test_many_odd_job_bodies_never_cause_a_server_error(fuzz_client: TestClient, upload, auth) -> None:
    file_id = upload(headers=auth).json()["id"]
    statuses = _check_job_creation(fuzz_client, auth, file_id, EXAMPLES_SLOW)
    assert len(statuses) >= EXAMPLES_SLOW and 200 in statuses and 400 in statuses
