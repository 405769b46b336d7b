"""Worker shutdown, shared by the Celery app (which hears SIGTERM in the main process) and the task
(which runs the job, in a pool child or, with the solo pool, in that same process).

Its own module so that ``worker.celery_app`` need not import ``worker.tasks`` (which imports the app to
register its task): no import cycle.
"""

from __future__ import annotations

import threading
from typing import Protocol


class Stoppable(Protocol):
    def shutdown(self) -> None: ...


_lock = threading.Lock()
requested = threading.Event()
"""Set once this process was asked to shut down; a job claimed afterwards stops before training."""
_current: Stoppable | None = None


def request_shutdown() -> bool:
    """Ask the job running in this process (if any) to checkpoint and stop. Signal-handler safe.

    Returns whether a job was running here.
    """
    requested.set()
    supervisor = _current
    if supervisor is not None:
        supervisor.shutdown()
        return True
    return False


def set_current(supervisor: Stoppable | None) -> None:
    """The job now running in this process (None once it ended)."""
    global _current
    with _lock:
        _current = supervisor
