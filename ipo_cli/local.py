"""``ipo models build-tiny|list`` and ``ipo data demo|validate``: local, no server needed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ipo_cli.errors import CliError

models = typer.Typer(help="Base models.", no_args_is_help=True)
data = typer.Typer(help="Preference data.", no_args_is_help=True)


def _models_dir() -> Path:
    from app.settings import Settings

    return Settings().resolved_models_dir


@models.command("build-tiny")
def build_tiny(
    out: Annotated[Path | None, typer.Option(help="Default: {models_dir}/tiny-mistral")] = None,
    seed: int = 0,
    force: bool = False,
) -> None:
    """Build the tiny Mistral-architecture model + tokenizer locally (no download), pre-trained on demo text."""
    from worker.training.tiny import build_tiny_model

    target = out or _models_dir() / "tiny-mistral"
    if (target / "config.json").exists() and not force:
        typer.echo(f"{target} already exists (use --force to rebuild)")
        return
    build_tiny_model(target, seed=seed)
    typer.echo(f"built {target}")


@models.command("list")
def list_models() -> None:
    """Allow-listed base models in the models directory."""
    from app.services.models_registry import list_base_models

    for name in list_base_models(_models_dir()):
        typer.echo(name)


@data.command("demo")
def demo_data(out: Annotated[Path, typer.Option()] = Path("var/data"), seed: int = 0) -> None:
    """Write the demo preference data set (train.jsonl, valid.jsonl)."""
    from worker.training.demo_data import write_demo_data

    train, valid = write_demo_data(out, seed=seed)
    typer.echo(f"wrote {train} and {valid}")


@data.command("validate")
def validate(path: Path, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Validate a preference JSONL file with the server's validator; exit 2 when it is invalid."""
    from contracts.data_formats import parse_preference_file

    if not path.is_file():
        raise CliError(f"no such file: {path}")
    _, report = parse_preference_file(path)
    if as_json:
        typer.echo(json.dumps(report.model_dump(mode="json")))
    else:
        typer.echo(report.summary(path.name))
    if not report.ok:
        raise typer.Exit(2)
