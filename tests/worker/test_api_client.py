from __future__ import annotations

import subprocess
import sys

import pytest

from contracts.internal import HeartbeatRequest
from tests.worker.conftest import JOB_ID
from tests.worker.fake_api import FakeApi, State
from worker.api_client import ApiClient, ApiError, ApiUnavailable, LeaseLost, NotClaimable
from worker.event_buffer import EventBuffer


def test_transient_statuses_are_retried(api: ApiClient, api_state: State) -> None:
    api_state.fail_next = [503, 429, 502]
    claim = api.claim(JOB_ID, "w1")
    assert claim.attempt == 1 and claim.lease_token == "lease-abc"
    assert [a for _, a in api_state.calls] == ["claim"]  # only the successful try reached the handler
    with pytest.raises(NotClaimable):
        api.claim(JOB_ID, "w1")


def test_gives_up_after_deadline(api: ApiClient, api_state: State) -> None:
    api_state.fail_next = [503] * 100
    with pytest.raises(ApiUnavailable):
        api.heartbeat(JOB_ID, HeartbeatRequest(lease_token="lease-abc"), retry_seconds=0.5)


def test_errors_carry_server_message(fake_api: FakeApi, api_state: State) -> None:
    with ApiClient(fake_api.url, "wrong-token", retry_seconds=1) as bad, pytest.raises(ApiError) as info:
        bad.claim(JOB_ID, "w1")
    assert info.value.status == 401 and info.value.message == "bad worker token"
    api_state.claimed = True
    api_state.lease_lost = True
    with ApiClient(fake_api.url, "test-worker-token", retry_seconds=1) as client, pytest.raises(LeaseLost):
        client.heartbeat(JOB_ID, HeartbeatRequest(lease_token="lease-abc"))


def test_event_buffer_keeps_order_across_outage(api: ApiClient, api_state: State, fake_api: FakeApi) -> None:
    buffer = EventBuffer(api, JOB_ID, "lease-abc", batch_size=3)
    for i in range(4):
        buffer.add(f"event {i}")
    fake_api.stop()
    assert buffer.flush(retry_seconds=0.3) is False
    for i in range(4, 7):
        buffer.add(f"event {i}")
    fake_api.start()
    assert buffer.flush() is True
    assert [(e["seq"], e["message"]) for e in api_state.events] == [(i, f"event {i}") for i in range(7)]
    assert buffer.pending == 0 and buffer.delivered == 7


def test_worker_imports_no_api_code() -> None:
    code = (
        "import sys, worker.tasks, worker.celery_app, worker.supervisor;"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('sqlalchemy', 'fastapi', 'app')];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
