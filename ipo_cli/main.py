"""Entry point of the ``ipo`` command: assembles the sub-commands. Errors are one line on stderr."""

from __future__ import annotations

import sys
import warnings

import typer

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
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
