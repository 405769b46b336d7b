"""CLI errors: one clear line on stderr and a documented exit status, never a traceback.

Exit statuses: 0 ok; 1 the job failed or was cancelled (``jobs watch``); 2 bad usage or input;
3 the server answered with an error; 4 the server or the database is unreachable; 5 the database is
missing, has no schema or is at another migration than this code's (run ``ipo migrate``).
"""

from __future__ import annotations

EXIT_UNREACHABLE = 4
EXIT_DATABASE_SCHEMA = 5


class CliError(Exception):
    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
