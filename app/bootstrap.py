"""First start of the embedded default: schema, a ``default`` project and a local API key.

The key is written once to ``{var_dir}/api_key`` (mode 0600) so the demo and the CLI find it; the
database only ever holds its hash.
"""

from __future__ import annotations

from pathlib import Path

from app.auth import create_key
from app.db import make_engine, make_sessionmaker
from app.migrate import upgrade
from app.settings import Settings


def ensure_local_key(settings: Settings, project: str = "default") -> tuple[str, bool]:
    """Return (api key, created). Creates one when ``{var_dir}/api_key`` is missing."""
    path: Path = settings.var_dir / "api_key"
    if path.exists():
        return path.read_text().strip(), False
    engine = make_engine(settings.resolved_database_url)
    try:
        with make_sessionmaker(engine)() as session, session.begin():
            _, raw = create_key(session, project, name="local")
    finally:
        engine.dispose()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(raw)
    path.chmod(0o600)
    return raw, True


def bootstrap(settings: Settings) -> tuple[str, bool]:
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url)
    settings.resolved_worker_token()
    return ensure_local_key(settings)
