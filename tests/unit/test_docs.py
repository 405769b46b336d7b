"""The docs a newcomer reads first point at files that exist, and nothing points outside the repo.

``AGENTS.md``'s "where things live" table and ``docs/design.md`` name files; when code moves, these
tests fail until the docs move with it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_PATH = re.compile(r"`((?:app|worker|contracts|ipo_cli|tests|bench|docs|migrations|tools|constraints)/[\w./-]+)`")


@pytest.mark.parametrize("doc", ["AGENTS.md", "docs/design.md", "docs/scaling.md", "README.md"])
def test_every_cited_path_exists(doc: str) -> None:
    text = (ROOT / doc).read_text()
    cited = {m.group(1).rstrip(".") for m in _PATH.finditer(text)}
    missing = sorted(p for p in cited if not (ROOT / p).exists())
    assert not missing, f"{doc} cites paths that do not exist: {missing}"


def test_agents_answers_the_five_questions_in_one_hop() -> None:
    text = (ROOT / "AGENTS.md").read_text()
    for question, where in [
        ("IPO loss", "worker/training/recipe.py"),
        ("worker dies", "app/services/dispatch.py"),
        ("Idempotency-Key", "app/routes/idempotent.py"),
        ("checkpoint recorded", "app/services/worker_protocol.py"),
        ("webhook signatures", "app/services/webhook_delivery.py"),
    ]:
        row = next((line for line in text.splitlines() if question in line and line.startswith("|")), None)
        assert row is not None, f"AGENTS.md has no row about {question!r}"
        assert where in row, f"AGENTS.md's row about {question!r} does not name {where}"


def test_nothing_points_outside_the_repository() -> None:
    offenders = []
    for path in [ROOT / "README.md", ROOT / "AGENTS.md", *ROOT.glob("docs/*.md"), *ROOT.glob("*/*.py")]:
        if "../shared" in path.read_text(errors="replace"):
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"these files point at ../shared, which a clone does not have: {offenders}"


def test_readme_links_the_design_and_reliability_docs() -> None:
    text = (ROOT / "README.md").read_text()
    for link in ["docs/design.md", "docs/reliability.md", "docs/scaling.md", "AGENTS.md"]:
        assert f"({link})" in text, f"README does not link {link}"
    assert "(docs/scaling.md)" in (ROOT / "AGENTS.md").read_text(), "AGENTS.md does not link docs/scaling.md"


def test_every_setting_has_a_row_in_the_readme_configuration_table() -> None:
    from app.settings import Settings
    from inference.settings import InferenceSettings
    from worker.settings import WorkerSettings

    rows = set(re.findall(r"^\| `(IPO_[A-Z0-9_]+)`", (ROOT / "README.md").read_text(), re.M))
    for settings_class in (Settings, WorkerSettings, InferenceSettings):
        prefix = settings_class.model_config.get("env_prefix", "")
        missing = sorted({f"{prefix}{name}".upper() for name in settings_class.model_fields} - rows)
        assert not missing, f"{settings_class.__name__} settings missing from the README's table: {missing}"
