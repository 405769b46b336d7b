"""The database as the CLI needs it: ready, or one line saying why not and the exit status for it.

``ipo keys``, ``ipo serve`` and ``ipo up`` call ``ready_database_url`` first. The embedded default (no
``IPO_DATABASE_URL``: SQLite under ``{var_dir}``) creates and migrates itself, as ``ipo up`` always has; a
configured database is never changed behind the operator's back: it must be migrated with ``ipo migrate``.

Exit statuses (``ipo_cli/errors.py``): 4 the database is unreachable; 5 it is missing, has no schema, or
is at another migration than this code's.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ipo_cli.errors import EXIT_DATABASE_SCHEMA, EXIT_UNREACHABLE, CliError

if TYPE_CHECKING:
    from app.migrate import SchemaProblem
    from app.settings import Settings


def _refusal(problem: SchemaProblem, url: str) -> CliError:
    """The one-line CliError for a database problem: exit 4 unreachable, else 5 with what to do."""
    from app.migrate import SchemaState, sqlite_path

    if problem.state is SchemaState.UNREACHABLE:
        return CliError(problem.message, EXIT_UNREACHABLE)
    if problem.state is SchemaState.UNKNOWN_REVISION:
        return CliError(f"{problem.message}: upgrade ipo-align", EXIT_DATABASE_SCHEMA)
    if problem.state is SchemaState.MISSING and sqlite_path(url) is None:
        return CliError(f"{problem.message}: create it (createdb), then run `ipo migrate`", EXIT_DATABASE_SCHEMA)
    return CliError(f"{problem.message}: run `ipo migrate` first", EXIT_DATABASE_SCHEMA)


def ready_database_url(settings: Settings) -> str:
    """The database URL, once the database is at this code's head migration.

    The embedded default is created and migrated when it is missing, empty or behind (a note on stderr).
    Raises CliError (exit 4 unreachable, 5 missing / no schema / other migration) otherwise.
    """
    from app.migrate import SchemaState, schema_problem, upgrade

    url = settings.resolved_database_url
    problem = schema_problem(url)
    if problem is None:
        return url
    embedded = settings.database_url is None
    if embedded and problem.state in (SchemaState.MISSING, SchemaState.NO_SCHEMA, SchemaState.BEHIND):
        with database_errors():
            upgrade(url)
        print(f"ipo: {problem.message}: migrated the embedded database to the latest schema", file=sys.stderr)
        return url
    raise _refusal(problem, url)


def migrate_database(settings: Settings) -> str:
    """``ipo migrate``: bring the database to the head migration. Returns what was done, in one line.

    Creates the SQLite file (and its folder) when missing. Refuses (CliError) a database it cannot reach
    (exit 4), a Postgres database that does not exist or one migrated by a newer release (exit 5).
    """
    from app.migrate import SchemaState, head_revision, schema_problem, sqlite_path, upgrade

    url = settings.resolved_database_url
    problem = schema_problem(url)
    if problem is None:
        return f"database is at the latest schema ({head_revision()})"
    creatable = problem.state is SchemaState.MISSING and sqlite_path(url) is not None
    if not creatable and problem.state not in (SchemaState.NO_SCHEMA, SchemaState.BEHIND):
        raise _refusal(problem, url)
    with database_errors():
        upgrade(url)
    if creatable:
        return f"created the database {sqlite_path(url)} at the latest schema ({head_revision()})"
    return f"{problem.message}; migrated it to the latest schema ({head_revision()})"


@contextmanager
def database_errors() -> Iterator[None]:
    """Turn a database error raised inside the block into a one-line CliError (exit 4)."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except SQLAlchemyError as exc:
        inner = getattr(exc, "orig", None) or exc
        lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
        raise CliError(f"database error: {lines[0] if lines else type(inner).__name__}", EXIT_UNREACHABLE) from exc
