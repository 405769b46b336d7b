"""The trainer child of one attempt: spawn, signals, the kill timer, and the pipe reader.

``python -m worker.training.run REQUEST_JSON --report-fd N`` runs in its own session (process group),
its output appended to ``trainer.log``; a reader thread turns its report lines into
``TrainerReport`` objects on :attr:`TrainerProcess.reports` (so the child never blocks on a slow
upload), then puts :data:`EOF`. See ``worker/training/request.py`` for the child's side of the contract.

A job on several devices runs ``accelerate launch`` as the child (``worker/launcher.py``), which starts one
rank per device, each in a session of its own (``worker/training/distributed.py``). Then stop signals go
to rank 0 (the ranks agree on the stop among themselves), every kill reaches each rank's session too, and
:meth:`TrainerProcess.lost_ranks` names the ranks that died without recording an exit.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from pydantic import ValidationError

from contracts.internal import TrainerReport
from worker.training.distributed import RANKS_DIR, process_start_time

log = logging.getLogger(__name__)

DEFAULT_TRAINER = (sys.executable, "-m", "worker.training.run")
EOF = object()
"""Put on :attr:`TrainerProcess.reports` once the report pipe is closed."""


class TrainerProcess:
    """One trainer child. :meth:`start` spawns it; :meth:`stop` signals it once and arms a timer that
    SIGKILLs its whole process group after ``stop_grace_seconds``; :meth:`kill_group` does so at once.

    The child is reaped only by :meth:`wait`, after its owner is done signalling it, so its pid (hence
    its group id) cannot have been reused by then.
    """

    def __init__(
        self,
        argv: Sequence[str],
        request_path: Path,
        attempt_dir: Path,
        *,
        stop_grace_seconds: float,
        env: Mapping[str, str] | None = None,
        label: str = "",
        n_processes: int = 1,
    ) -> None:
        self.argv = list(argv)
        self.n_processes = n_processes
        """Ranks the child starts (> 1: ``argv`` is ``accelerate launch``; see the module doc)."""
        self.request_path = Path(request_path)
        self.attempt_dir = Path(attempt_dir)
        self.log_path = self.attempt_dir / "trainer.log"
        self.stop_grace_seconds = stop_grace_seconds
        self.env = dict(env) if env is not None else None
        self.label = label
        """Names the job in log lines."""
        self.reports: queue.Queue[object] = queue.Queue()
        """``TrainerReport`` objects in the order the child wrote them, then :data:`EOF`."""
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._kill_timer: threading.Timer | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc is not None else None

    def start(self) -> int:
        """Spawn the child and its pipe reader; returns the child's pid."""
        read_fd, write_fd = os.pipe()
        argv = [*self.argv, str(self.request_path), "--report-fd", str(write_fd)]
        self.attempt_dir.mkdir(parents=True, exist_ok=True)
        try:
            with open(self.log_path, "ab") as trainer_log:
                self._proc = subprocess.Popen(
                    argv,
                    start_new_session=True,  # own process group: one killpg reaches every helper it forks
                    pass_fds=(write_fd,),
                    stdin=subprocess.DEVNULL,
                    stdout=trainer_log,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        # The reader runs in a copy of this context, so its log lines keep the job id and attempt.
        self._reader = threading.Thread(
            target=contextvars.copy_context().run, args=(self._read_reports, read_fd), name="report-reader", daemon=True
        )
        self._reader.start()
        return self._proc.pid

    # ---- signals ----

    def send_signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the trainer only (its helpers, e.g. dataloader workers, would die of SIGUSR1); in a
        launched run to rank 0, once it has started (until then a thread waits for it, see :meth:`stop`)."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        if self.n_processes > 1:
            self._signal_rank0_when_started(sig)
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)

    def _signal_rank0_when_started(self, sig: signal.Signals) -> None:
        """Rank 0's pid is known once it recorded it; a stop asked before then is delivered when it has (the
        launcher itself would die of SIGUSR1, and on SIGTERM would only pass it to every rank)."""

        def deliver() -> None:
            while not self.has_exited():
                ranks = self.ranks()
                if 0 in ranks:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(ranks[0], sig)
                    return
                threading.Event().wait(0.2)

        if 0 in self.ranks():
            deliver()
        else:
            threading.Thread(target=deliver, name="signal-rank0", daemon=True).start()

    def ranks(self) -> dict[int, int]:
        """``{rank: pid}`` of the ranks of a launched run that recorded themselves and are still that process
        (pid and start time match: a pid the kernel gave to another process is left alone)."""
        found: dict[int, int] = {}
        for path in (self.attempt_dir / RANKS_DIR).glob("rank-*.json"):
            if path.name.endswith(".exit.json"):
                continue
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
                pid = int(record["pid"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if record.get("start_time") is not None and process_start_time(pid) == record["start_time"]:
                found[int(record["rank"])] = pid
        return found

    def lost_ranks(self) -> list[int]:
        """Ranks of a launched run that did not record an exit (``rank-{R}.exit.json``): killed or crashed.
        Empty for a single-process trainer."""
        if self.n_processes <= 1:
            return []
        ranks_dir = self.attempt_dir / RANKS_DIR
        return [r for r in range(self.n_processes) if not (ranks_dir / f"rank-{r}.exit.json").is_file()]

    def stop(self, sig: signal.Signals) -> None:
        """Ask the trainer to stop with ``sig``; SIGKILL its group if it is still there after the grace."""
        self.send_signal(sig)
        if self._kill_timer is None:
            self._kill_timer = threading.Timer(self.stop_grace_seconds, self.kill_group)
            self._kill_timer.daemon = True
            self._kill_timer.start()

    def kill_group(self) -> None:
        """SIGKILL the child's whole process group (the child, if not yet reaped, and every helper), and in a
        launched run each rank's group (the ranks also die with the launcher: ``PR_SET_PDEATHSIG``)."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # start_new_session: the group id is the child's pid
        if self.n_processes > 1:
            for pid in self.ranks().values():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)  # torch starts each rank in a session of its own

    def has_exited(self) -> bool:
        """Whether the child exited, without reaping it (WNOWAIT keeps its pid, hence its group id, ours)."""
        if self._proc is None:
            return True
        try:
            return os.waitid(os.P_PID, self._proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True

    def wait(self) -> int:
        """Cancel the kill timer, kill what the trainer left behind, reap it; returns its exit status."""
        if self._kill_timer is not None:
            self._kill_timer.cancel()
        self.kill_group()  # helpers the trainer left behind; the zombie keeps the group id ours
        assert self._proc is not None, "wait() before start()"
        returncode = self._proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)
        return returncode

    def log_tail(self, max_chars: int = 1500) -> str:
        """`` Last output:\\n...`` (the end of trainer.log), or ``""`` when there is none."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - max_chars))
                tail = f.read().decode("utf-8", "replace").strip()
        except OSError:
            return ""
        return f" Last output:\n{tail}" if tail else ""

    # ---- the report pipe ----

    def _read_reports(self, fd: int) -> None:
        with open(fd, "rb", buffering=0, closefd=True) as pipe:
            buffered = b""
            while chunk := pipe.read(65536):
                buffered += chunk
                *lines, buffered = buffered.split(b"\n")
                for line in lines:
                    self._parse(line)
            self._parse(buffered)
        self.reports.put(EOF)

    def _parse(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            self.reports.put(TrainerReport.model_validate(json.loads(line)))
        except (ValueError, ValidationError) as exc:
            log.warning("job %s: ignoring malformed report line %r: %s", self.label, line[:200], exc)
