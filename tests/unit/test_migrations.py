"""The schema only changes through Alembic: upgrade an empty database, compare with the models
(no autogenerate diff), downgrade to base and upgrade again."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from app.migrate import downgrade, upgrade
from app.models import Base
from tests.conftest import fresh_database


@pytest.fixture
def empty_db(tmp_path: Path) -> Iterator[str]:
    with fresh_database(tmp_path, "ipo_mig") as url:
        yield url


def _diff(url: str) -> list[object]:
    engine = create_engine(url)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, Base.metadata)
    engine.dispose()
    return list(diff)


def test_upgrade_matches_models_and_round_trips(empty_db: str) -> None:
    upgrade(empty_db)
    assert _diff(empty_db) == []
    tables = set(inspect(create_engine(empty_db)).get_table_names())
    assert {"projects", "api_keys", "files", "jobs", "job_events", "checkpoints", "outbox"} <= tables
    downgrade(empty_db, "base")
    assert set(inspect(create_engine(empty_db)).get_table_names()) <= {"alembic_version"}
    upgrade(empty_db)
    assert _diff(empty_db) == []


def test_every_tenant_row_carries_project_id() -> None:
    for name in (
        "api_keys",
        "files",
        "jobs",
        "job_events",
        "checkpoints",
        "outbox",
        "idempotency_keys",
        "webhook_endpoints",
        "webhook_deliveries",
        "dashboard_sessions",
    ):
        assert "project_id" in Base.metadata.tables[name].c, name
