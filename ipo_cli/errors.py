"""CLI errors: one clear line on stderr and a documented exit status, never a traceback.

Exit statuses: 0 ok; 1 the job failed or was cancelled (``jobs watch``); 2 bad usage or input;
3 the server answered with an error; 4 the server is unreachable.
"""

from __future__ import annotations


class CliError(Exception):
    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
