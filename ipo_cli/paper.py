"""``ipo paper-check`` (Azar et al. 2023's bandit through the service's trainer) and ``ipo adapters merge``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ipo_cli.errors import CliError

adapters = typer.Typer(help="Trained LoRA adapters.", no_args_is_help=True)


def paper_check(
    prefs: Annotated[str, typer.Option(help='Preference pairs, e.g. "y1>y2,y2>y3,y1>y3" (repeats allowed)')] = (
        "y1>y2,y2>y3,y1>y3"
    ),
    tau: Annotated[float, typer.Option(help="IPO tau (TRL beta)")] = 0.5,
    ref: Annotated[str | None, typer.Option(help="Reference probabilities, e.g. 0.5,0.3,0.2 (default uniform)")] = None,
    loss: Annotated[str, typer.Option(help="ipo or dpo")] = "ipo",
    steps: Annotated[int, typer.Option(help="Full-batch SGD steps")] = 100,
    tol: Annotated[float, typer.Option(help="Max |learned - optimum| for IPO to pass")] = 0.005,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Reproduce the IPO paper's bandit (arXiv 2310.12036, Sec. 5) with the service's TRL trainer.

    Exit 0 when the IPO policy matches the closed-form optimum within --tol (always 0 for --loss dpo,
    which shows DPO's collapse instead), 1 otherwise.
    """
    from worker.training.paper import format_table, train_bandit

    if loss not in ("ipo", "dpo"):
        raise CliError("--loss must be ipo or dpo")
    if tau <= 0:
        raise CliError("--tau must be positive")
    try:
        result = train_bandit(prefs, tau, ref=ref, loss=loss, steps=steps)
    except ValueError as e:
        raise CliError(str(e)) from e
    ok = loss == "dpo" or result.max_abs_diff <= tol
    if as_json:
        typer.echo(json.dumps({**result.to_dict(), "tolerance": tol, "ok": ok}))
    else:
        typer.echo(format_table(result))
        if loss == "ipo":
            typer.echo(f"{'PASS' if ok else 'FAIL'}: tolerance {tol:g}")
        else:
            typer.echo(f"DPO: pi({result.actions[0]}) = {result.learned[0]:.6f} (IPO keeps {result.optimum[0]:.6f})")
    if not ok:
        raise typer.Exit(1)


@adapters.command("merge")
def merge(
    base: Annotated[Path, typer.Option(help="Base model directory")],
    adapter: Annotated[Path, typer.Option(help="LoRA adapter directory (a job's adapter artifact)")],
    out: Annotated[Path, typer.Option(help="Where to write the merged standalone model")],
) -> None:
    """Fold a LoRA adapter into its base model and save a standalone safetensors model + tokenizer."""
    from worker.training.merge import MergeError, merge_adapter

    try:
        target = merge_adapter(base, adapter, out)
    except MergeError as e:
        raise CliError(str(e)) from e
    typer.echo(f"merged {adapter} into {base} -> {target}")
