"""Run Alembic programmatically (``ipo migrate``, ``ipo up``, tests): the schema only changes here.

``schema_problem`` says, without changing anything, why a database cannot be used yet: it is missing,
unreachable, has no schema, or is at an older (or unknown) migration. The CLI turns that into a one-line
reason and an exit status (``ipo_cli/database.py``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, pool
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

ROOT = Path(__file__).resolve().parent.parent


def alembic_config(database_url: str) -> Config:
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    """Migrate to ``revision``. A SQLite file's folder is created first (the file itself by SQLite)."""
    path = sqlite_path(database_url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(database_url), revision)


def sqlite_path(database_url: str) -> Path | None:
    """The file of a SQLite URL, or None for another database or an in-memory SQLite."""
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return Path(url.database)


def head_revision() -> str:
    """The newest migration this code ships (``migrations/versions``)."""
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None, "migrations/versions is empty"
    return head


class SchemaState(enum.Enum):
    """Why a database is not ready (``SchemaProblem.state``)."""

    MISSING = "missing"
    """No SQLite file at the path, or the Postgres database does not exist."""
    UNREACHABLE = "unreachable"
    """The server refuses or cannot be reached, or the file is not a database."""
    NO_SCHEMA = "no_schema"
    """Reachable but never migrated."""
    BEHIND = "behind"
    """At an older migration than this code's head."""
    UNKNOWN_REVISION = "unknown_revision"
    """At a migration this code does not ship (a newer release migrated it)."""


@dataclass(frozen=True)
class SchemaProblem:
    state: SchemaState
    message: str
    """One line naming the database (password hidden) and the cause."""


def _first_line(exc: BaseException) -> str:
    inner = getattr(exc, "orig", None) or exc
    lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
    return lines[0] if lines else type(inner).__name__


def schema_problem(database_url: str) -> SchemaProblem | None:
    """None when the database is at this code's head migration, else what is wrong with it.

    Read-only: a missing SQLite file is not created (SQLite would create an empty one on connect), and a
    connection failure is reported, not raised. Postgres gets 5 s to answer (``connect_timeout``).
    """
    url = make_url(database_url)
    shown = url.render_as_string(hide_password=True)
    path = sqlite_path(database_url)
    if path is not None and not path.exists():
        return SchemaProblem(SchemaState.MISSING, f"no database file at {path}")
    connect_args = {} if path is not None or url.get_backend_name() == "sqlite" else {"connect_timeout": 5}
    engine = create_engine(url, poolclass=pool.NullPool, connect_args=connect_args)
    try:
        with engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
            tables = set(inspect(conn).get_table_names())
    except SQLAlchemyError as exc:
        reason = _first_line(exc)
        state = SchemaState.MISSING if "does not exist" in reason and "database" in reason else SchemaState.UNREACHABLE
        return SchemaProblem(state, f"cannot open the database {shown}: {reason}")
    finally:
        engine.dispose()
    head = head_revision()
    if current is None:
        extra = f" (it has {len(tables)} other tables)" if tables - {"alembic_version"} else ""
        return SchemaProblem(SchemaState.NO_SCHEMA, f"the database {shown} has no schema{extra}")
    if current == head:
        return None
    scripts = ScriptDirectory.from_config(alembic_config(database_url))
    known = {rev.revision for rev in scripts.walk_revisions()}
    if current not in known:
        return SchemaProblem(
            SchemaState.UNKNOWN_REVISION,
            f"the database {shown} is at migration {current}, which this version of ipo-align does not have "
            f"(newest here: {head}); it was migrated by a newer release",
        )
    return SchemaProblem(
        SchemaState.BEHIND, f"the database {shown} is at migration {current}, older than this code's {head}"
    )


def downgrade(database_url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(database_url), revision)
