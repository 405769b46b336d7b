"""Entry point of the ``ipo`` command: assembles the sub-commands. Errors are one line on stderr."""

from __future__ import annotations

import sys
import warnings

import typer
from pydantic import ValidationError

from ipo_cli import admin, client_commands, local, paper, server
from ipo_cli.errors import CliError

app = typer.Typer(
    help="ipo-align: IPO/DPO preference alignment as a service.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
server.register(app)
app.add_typer(admin.keys, name="keys")
app.add_typer(local.models, name="models")
app.add_typer(local.data, name="data")
app.add_typer(client_commands.files, name="files")
app.add_typer(client_commands.jobs, name="jobs")
app.command("demo")(client_commands.demo_command)
app.command("paper-check")(paper.paper_check)
app.add_typer(paper.adapters, name="adapters")


def main() -> None:
    # Library deprecation notices are for us, not for the person at the terminal.
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        app()
    except CliError as exc:
        print(f"ipo: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except ValidationError as exc:  # settings from the environment (IPO_*) that do not validate
        if not exc.title.endswith("Settings"):
            raise
        print(f"ipo: error: {settings_problem(exc)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


def settings_problem(exc: ValidationError) -> str:
    """One line naming each setting that failed by its environment variable (every settings class reads
    ``IPO_`` + the field name) with pydantic's reason: ``IPO_STORAGE_PRESIGN_SECONDS=604801: Input should
    be less than or equal to 604800``."""
    parts = []
    for error in exc.errors():
        name = "IPO_" + "_".join(str(p) for p in error["loc"]).upper()
        value = error.get("input")
        shown = f"={value}" if isinstance(value, str | int | float) else ""
        parts.append(f"{name}{shown}: {error['msg']}")
    return "invalid setting " + "; ".join(parts)


if __name__ == "__main__":
    main()
