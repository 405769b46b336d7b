"""``ipo keys create|list|revoke``: API keys, run on the server host (talks to the database)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer

from ipo_cli.database import database_errors
from ipo_cli.errors import CliError

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

keys = typer.Typer(help="Manage API keys (run on the server host).", no_args_is_help=True)


def _sessions() -> sessionmaker[Session]:
    """A session factory on a database at the head migration (else a one-line CliError, exit 4 or 5;
    the embedded default migrates itself: ipo_cli/database.py)."""
    from app.db import make_engine, make_sessionmaker
    from app.settings import Settings
    from ipo_cli.database import ready_database_url

    return make_sessionmaker(make_engine(ready_database_url(Settings())))


@keys.command("create")
def create(
    project: Annotated[str, typer.Option(help="Project name (created if new).")],
    name: Annotated[str, typer.Option(help="A label for the key.")] = "",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Create a key. It is shown once: the server keeps only its hash."""
    from app.auth import create_key

    with database_errors(), _sessions()() as session, session.begin():
        row, raw = create_key(session, project, name)
        out = {"id": row.id, "project": project, "key": raw}
    typer.echo(json.dumps(out) if as_json else f"{raw}\n(key id {out['id']}, project {project}; shown once)")


@keys.command("list")
def list_keys(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List keys (prefix only)."""
    from sqlalchemy import select

    from app.models import ApiKey, Project

    with database_errors(), _sessions()() as session:
        rows = session.execute(select(ApiKey, Project.name).join(Project).order_by(ApiKey.created_at)).all()
        data = [
            {"id": k.id, "project": p, "prefix": k.prefix, "name": k.name, "revoked": k.revoked_at is not None}
            for k, p in rows
        ]
    if as_json:
        typer.echo(json.dumps(data))
        return
    for d in data:
        typer.echo(f"{d['id']}  {d['prefix']}...  project={d['project']}  {'REVOKED' if d['revoked'] else 'active'}")


@keys.command("revoke")
def revoke(key_id: str) -> None:
    """Revoke a key: refused by every API process within IPO_API_KEY_CACHE_SECONDS (2 s by default)."""
    from app.models import ApiKey
    from app.models.base import utcnow

    with database_errors(), _sessions()() as session, session.begin():
        row = session.get(ApiKey, key_id)
        if row is None:
            raise CliError(f"no such key: {key_id}")
        row.revoked_at = row.revoked_at or utcnow()
    typer.echo(f"revoked {key_id}")
