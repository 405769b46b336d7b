"""``ipo keys create|list|revoke`` through the real entry point, against the test database: the key is
shown once, stored as prefix + hash, and a revoked key is refused once the API's cached lookup of it
expires (``IPO_API_KEY_CACHE_SECONDS``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from fastapi.testclient import TestClient
from sqlalchemy import select

from app.models import ApiKey
from app.settings import Settings


def _ipo(settings: Settings, *args: str) -> str:
    env = {**os.environ, "IPO_DATABASE_URL": settings.resolved_database_url, "IPO_VAR_DIR": str(settings.var_dir)}
    out = subprocess.run(
        [sys.executable, "-m", "ipo_cli.main", "keys", *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_create_list_revoke(client: TestClient, settings: Settings) -> None:
    created = json.loads(_ipo(settings, "create", "--project", "cli-keys", "--json"))
    raw, key_id = created["key"], created["id"]
    headers = {"Authorization": f"Bearer {raw}"}
    assert client.get("/v1/fine_tuning/jobs", headers=headers).status_code == 200

    with client.app.state.ctx.sessions() as session:  # type: ignore[attr-defined]
        row = session.scalar(select(ApiKey).where(ApiKey.id == key_id))
        assert row is not None and raw not in (row.prefix, row.key_hash) and raw.startswith(row.prefix)

    listed = json.loads(_ipo(settings, "list", "--json"))
    assert {"id": key_id, "project": "cli-keys", "revoked": False}.items() <= next(
        k for k in listed if k["id"] == key_id
    ).items()
    assert all(raw not in json.dumps(k) for k in listed)

    _ipo(settings, "revoke", key_id)
    # Refused once this process's cached lookup is older than IPO_API_KEY_CACHE_SECONDS (tests/api/
    # test_key_cache.py): move the cache's clock past it rather than sleep.
    cache = client.app.state.ctx.key_cache  # type: ignore[attr-defined]
    cache.clock = lambda: time.monotonic() + cache.ttl_seconds + 1
    r = client.get("/v1/fine_tuning/jobs", headers=headers)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
