"""Every CLI command that uses the database, against each state a database can be in: missing,
unreachable, without schema, at an older migration, at a migration this code does not know. Each ends in
one line on stderr and its documented exit status (ipo_cli/errors.py: 4 unreachable, 5 not migrated), never
a traceback, and leaves the database as it found it. Real SQLite files, and with ``TEST_DATABASE_URL`` real
Postgres databases created and dropped here."""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from app.migrate import downgrade, head_revision, schema_problem, upgrade
from ipo_cli.main import main
from tests.conftest import fresh_database

REPO = Path(__file__).resolve().parents[2]
OLDER = "0002"
"""A migration older than head (migrations/versions/0002_jobs_status_index.py)."""

DB_COMMANDS = [("keys", "create", "--project", "p"), ("keys", "list"), ("keys", "revoke", "key_x"), ("serve",)]
"""Commands that need a migrated database and must never change one (``migrate`` and ``up`` migrate)."""


def ipo(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, url: str | None, var: Path, *args: str
) -> tuple[int, str, str]:
    """Run ``ipo ARGS`` in this process with IPO_DATABASE_URL=url (None: the embedded default under var)."""
    if url is None:
        monkeypatch.delenv("IPO_DATABASE_URL", raising=False)
    else:
        monkeypatch.setenv("IPO_DATABASE_URL", url)
    monkeypatch.setenv("IPO_VAR_DIR", str(var))
    monkeypatch.setattr(sys, "argv", ["ipo", *args])
    capsys.readouterr()
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_reason(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("ipo: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def state(url: str) -> str | None:
    problem = schema_problem(url)
    return None if problem is None else problem.state.value


def _stamp(url: str, revision: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = :r"), {"r": revision})
    engine.dispose()


@pytest.fixture
def db(tmp_path: Path) -> Iterator[str]:
    """A fresh empty database: Postgres with TEST_DATABASE_URL, else a SQLite file that exists but is empty."""
    with fresh_database(tmp_path, prefix="ipo_cli_db") as url:
        if url.startswith("sqlite"):
            sqlite3.connect(url.split("///", 1)[1]).execute("PRAGMA user_version = 1").connection.close()
        yield url


def missing_url(tmp_path: Path) -> str:
    if os.environ.get("TEST_DATABASE_URL"):
        return (
            make_url(os.environ["TEST_DATABASE_URL"])
            .set(database=f"ipo_absent_{secrets.token_hex(4)}")
            .render_as_string(hide_password=False)
        )
    return f"sqlite:///{tmp_path / 'absent' / 'ipo.db'}"


def unreachable_url(tmp_path: Path) -> str:
    if os.environ.get("TEST_DATABASE_URL"):
        return make_url(os.environ["TEST_DATABASE_URL"]).set(port=1).render_as_string(hide_password=False)
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a SQLite database" * 10)
    return f"sqlite:///{garbage}"


@pytest.mark.parametrize("args", DB_COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_commands_refuse_a_database_that_is_not_ready(
    args: tuple[str, ...], db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    var = tmp_path / "var"
    absent = missing_url(tmp_path)
    code, _, err = ipo(capsys, monkeypatch, absent, var, *args)
    assert code == 5, err
    reason = one_line_reason(err)
    assert ("does not exist" in reason or "no database file at" in reason) and "ipo migrate" in reason
    assert schema_problem(absent) is not None and not (tmp_path / "absent").exists()  # nothing created

    code, _, err = ipo(capsys, monkeypatch, unreachable_url(tmp_path), var, *args)
    assert code == 4, err
    assert "cannot open the database" in one_line_reason(err)

    code, _, err = ipo(capsys, monkeypatch, db, var, *args)
    assert code == 5, err
    assert "has no schema: run `ipo migrate` first" in one_line_reason(err)
    assert state(db) == "no_schema"

    upgrade(db, OLDER)
    code, _, err = ipo(capsys, monkeypatch, db, var, *args)
    assert code == 5, err
    assert (
        f"is at migration {OLDER}, older than this code's {head_revision()}: run `ipo migrate` first"
        in one_line_reason(err)
    )
    assert state(db) == "behind"  # not migrated behind the operator's back

    upgrade(db)
    _stamp(db, "9999_from_the_future")
    code, _, err = ipo(capsys, monkeypatch, db, var, *args)
    assert code == 5, err
    assert "at migration 9999_from_the_future, which this version of ipo-align does not have" in one_line_reason(err)
    assert not var.exists() or not (var / "ipo.db").exists()


def test_migrate_in_each_state(
    db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    var = tmp_path / "var"
    head = head_revision()
    absent = missing_url(tmp_path)
    code, out, err = ipo(capsys, monkeypatch, absent, var, "migrate")
    if absent.startswith("sqlite"):  # a SQLite file (and its folder) is created
        assert (
            code == 0 and f"created the database {tmp_path / 'absent' / 'ipo.db'} at the latest schema ({head})" in out
        ), err
        assert schema_problem(absent) is None
    else:  # a Postgres database is the operator's to create
        assert code == 5 and "create it (createdb), then run `ipo migrate`" in one_line_reason(err)

    code, _, err = ipo(capsys, monkeypatch, unreachable_url(tmp_path), var, "migrate")
    assert code == 4 and "cannot open the database" in one_line_reason(err)

    upgrade(db, OLDER)
    code, out, err = ipo(capsys, monkeypatch, db, var, "migrate")
    assert (
        code == 0 and f"at migration {OLDER}, older than this code's {head}; migrated it to the latest schema" in out
    ), err
    code, out, err = ipo(capsys, monkeypatch, db, var, "migrate")
    assert code == 0 and f"database is at the latest schema ({head})" in out, err

    _stamp(db, "9999_from_the_future")
    code, _, err = ipo(capsys, monkeypatch, db, var, "migrate")
    assert code == 5 and "upgrade ipo-align" in one_line_reason(err)

    code, _, err = ipo(capsys, monkeypatch, unreachable_url(tmp_path), var, "up", "--port", "1")
    assert code == 4 and "cannot open the database" in one_line_reason(err)
    code, _, err = ipo(capsys, monkeypatch, db, var, "up", "--port", "1")
    assert code == 5 and "upgrade ipo-align" in one_line_reason(err)


def test_a_migrated_database_works_and_keys_round_trip(
    db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    var = tmp_path / "var"
    assert ipo(capsys, monkeypatch, db, var, "migrate")[0] == 0
    code, out, err = ipo(capsys, monkeypatch, db, var, "keys", "create", "--project", "p", "--json")
    assert code == 0 and json.loads(out)["project"] == "p", err
    code, _, err = ipo(capsys, monkeypatch, db, var, "keys", "revoke", "key_missing")
    assert code == 2 and one_line_reason(err) == "ipo: error: no such key: key_missing"


def test_the_embedded_default_creates_and_migrates_itself(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    var = tmp_path / "fresh" / "var"
    code, out, err = ipo(capsys, monkeypatch, None, var, "keys", "create", "--project", "p")
    assert code == 0, err
    assert "migrated the embedded database to the latest schema" in err and "shown once" in out
    assert schema_problem(f"sqlite:///{var / 'ipo.db'}") is None
    downgrade(f"sqlite:///{var / 'ipo.db'}", OLDER)  # an older release's embedded database is brought up too
    code, out, err = ipo(capsys, monkeypatch, None, var, "keys", "list")
    assert code == 0 and "project=p" in out and f"at migration {OLDER}" in err, err


def test_a_fresh_directory_through_the_real_entry_point(tmp_path: Path) -> None:
    """The reported fault: `ipo migrate` then `ipo keys create` in an empty directory (./var does not exist)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IPO_")}
    for args in (["migrate"], ["keys", "create", "--project", "demo"], ["keys", "list"]):
        done = subprocess.run(
            [sys.executable, "-m", "ipo_cli.main", *args],
            cwd=tmp_path,
            env={**env, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0 and "Traceback" not in done.stderr, (args, done.stderr)
    assert schema_problem(f"sqlite:///{tmp_path / 'var' / 'ipo.db'}") is None
    assert "project=demo" in done.stdout
