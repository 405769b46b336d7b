"""``ipo jobs events --all`` pages through every event (the API's page is at most 100), oldest first."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ipo_cli import client_commands

EVENTS = [{"id": f"ftevent-{i}", "level": "info", "message": f"event {i}"} for i in range(1, 251)]


class FakeClient:
    """The events endpoint's paging: newest first, ``after`` = older than that id, ``limit`` <= 100."""

    calls: list[dict[str, Any]] = []

    def __init__(self, *_: Any) -> None:
        pass

    def json(self, method: str, path: str, params: dict[str, Any]) -> dict[str, Any]:
        FakeClient.calls.append(params)
        assert params["limit"] <= 100
        newest_first = EVENTS[::-1]
        if "after" in params:
            cut = int(params["after"].removeprefix("ftevent-"))
            newest_first = [e for e in newest_first if int(e["id"].removeprefix("ftevent-")) < cut]
        page = newest_first[: params["limit"]]
        return {"object": "list", "data": page, "has_more": len(newest_first) > len(page)}


def test_all_pages_through_every_event(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(client_commands, "ApiClient", FakeClient)
    client_commands.jobs_events("ftjob-1", all_events=True, as_json=True)
    listed = json.loads(capsys.readouterr().out)
    assert [e["id"] for e in listed["data"]] == [e["id"] for e in EVENTS[::-1]] and listed["has_more"] is False
    assert len(FakeClient.calls) == 3  # 100 + 100 + 50

    client_commands.jobs_events("ftjob-1", limit=3)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["ftevent-248", "ftevent-249", "ftevent-250"]  # oldest first
