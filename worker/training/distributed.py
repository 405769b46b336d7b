"""One trainer, several processes: what each rank of an ``accelerate launch`` run does differently.

The worker starts ``accelerate launch --num_processes N ... -m worker.training.run REQUEST --report-fd FD``
(``worker/launcher.py``) for a job with ``n_gpus`` > 1. torch's launcher (``torch.distributed.run``, which
``accelerate launch`` calls in-process) starts one rank per device, each in a session of its own and with
every inherited descriptor but stdin/stdout/stderr closed. So each rank, at start (:func:`start_rank`):

- asks the kernel to SIGKILL it when the launcher dies (``PR_SET_PDEATHSIG``): the worker kills the
  launcher's process group, which the ranks are not in;
- writes ``{output_dir}/ranks/rank-{R}.json`` (pid and start time) so the worker can signal rank 0 and
  kill every rank (``worker.trainer_process``), and ``rank-{R}.exit.json`` with its exit code when it ends
  (:func:`record_exit`): a rank without one died without a word (killed, crashed) and the attempt fails
  with a retryable ``rank_died`` (``worker.outcome``);
- rank 0 alone reports (events, metrics, checkpoints, artifacts, errors): it reopens the launcher's report
  pipe through ``/proc/{launcher pid}/fd/{FD}`` (Linux); the other ranks get a :class:`NullReporter`.

Stops agree across ranks: the worker signals rank 0 only, and every step end all ranks take the strongest
stop any of them saw (:func:`agree_on_stop`, one all-reduce of one integer), so all of them save the
pause checkpoint at the same step and none waits forever in a collective for a rank that left.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contracts.internal import StopReason
from worker.training.reporter import _ReportBuilder

RANKS_DIR = "ranks"
"""Under the attempt's ``output_dir``: one ``rank-{R}.json`` and, once it ends, ``rank-{R}.exit.json`` per rank."""

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_STOP_CODES: dict[StopReason | None, int] = {None: 0, "shutdown": 1, "paused": 2, "cancelled": 3}
_STOP_REASONS = {code: reason for reason, code in _STOP_CODES.items()}


@dataclass(frozen=True)
class Rank:
    """This process's place in the run, from the variables torch's launcher sets (``RANK``, ``LOCAL_RANK``,
    ``WORLD_SIZE``); rank 0 of 1 when started without a launcher."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that reports and writes the outputs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def current_rank() -> Rank:
    """The :class:`Rank` of this process (``RANK``/``LOCAL_RANK``/``WORLD_SIZE``; 0, 0, 1 when unset)."""
    env = os.environ
    return Rank(
        rank=int(env.get("RANK", "0")),
        local_rank=int(env.get("LOCAL_RANK", "0")),
        world_size=int(env.get("WORLD_SIZE", "1")),
    )


class NullReporter(_ReportBuilder):
    """The reporter of ranks other than 0: their reports would repeat rank 0's, so they go nowhere; errors
    are logged (to the attempt's trainer.log, which holds every rank's output) and kept in :attr:`errors`
    for the rank's exit record."""

    def __init__(self) -> None:
        self.errors: list[tuple[str, str]] = []

    def emit(self, report: Any) -> None:
        return None

    def error(self, code: str, message: str) -> None:
        import logging

        logging.getLogger(__name__).error("rank %d: %s: %s", current_rank().rank, code, message)
        self.errors.append((code, message))


def process_start_time(pid: int) -> int | None:
    """Field 22 of ``/proc/{pid}/stat`` (clock ticks after boot): with the pid it names one process for good,
    so a pid the kernel handed to another process is never signalled. None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces: count from the last ")"
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def _die_with_parent() -> None:
    """SIGKILL this process when its parent (the launcher) dies; exit at once if it already has."""
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the launcher died before prctl: the kernel would not tell us
        os._exit(1)


def start_rank(rank: Rank, output_dir: Path) -> None:
    """What every rank of a launched run does first: die with the launcher, record its pid (see module doc)."""
    _die_with_parent()
    ranks = output_dir / RANKS_DIR
    ranks.mkdir(parents=True, exist_ok=True)
    record = {"rank": rank.rank, "pid": os.getpid(), "start_time": process_start_time(os.getpid())}
    tmp = ranks / f".rank-{rank.rank}.json.tmp"
    tmp.write_text(json.dumps(record), encoding="utf-8")
    os.replace(tmp, ranks / f"rank-{rank.rank}.json")  # atomic: the worker never reads half a record


def record_exit(rank: Rank, output_dir: Path, exit_code: int, error: tuple[str, str] | None = None) -> None:
    """``rank-{R}.exit.json``: this rank ended by itself with ``exit_code`` (and its error, if it had one)."""
    ranks = output_dir / RANKS_DIR
    ranks.mkdir(parents=True, exist_ok=True)
    body = {"rank": rank.rank, "exit_code": exit_code, "error": list(error) if error else None}
    (ranks / f"rank-{rank.rank}.exit.json").write_text(json.dumps(body), encoding="utf-8")


def open_report_fd(fd: int, rank: Rank) -> int:
    """The descriptor rank 0 writes reports to: ``fd`` itself when this process has it (started without a
    launcher), else the launcher's ``fd`` reopened through ``/proc/{parent}/fd/{fd}`` (the write end of the
    worker's pipe, which torch's launcher keeps open but does not pass on). Raises ``OSError`` when neither
    works."""
    with contextlib.suppress(OSError):
        os.fstat(fd)
        if not rank.distributed:
            return fd
    if not rank.distributed:
        raise OSError(f"report descriptor {fd} is not open")
    return os.open(f"/proc/{os.getppid()}/fd/{fd}", os.O_WRONLY | os.O_CLOEXEC)


def agree_on_stop(reason: StopReason | None) -> StopReason | None:
    """The strongest stop any rank saw (``cancelled`` > ``paused`` > ``shutdown`` > none): one all-reduce of
    one integer over the default process group; ``reason`` itself when no group is initialised."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return reason
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    code = torch.tensor([_STOP_CODES[reason]], dtype=torch.int64, device=device)
    dist.all_reduce(code, op=dist.ReduceOp.MAX)
    return _STOP_REASONS[int(code.item())]


def fsdp_active() -> bool:
    """Whether this run is sharded with FSDP: ``accelerate launch`` with an FSDP config file
    (``IPO_ACCELERATE_CONFIG``) sets ``ACCELERATE_USE_FSDP=true`` for every rank. Then the model is loaded
    for sharding (``loading.model_kwargs``) and the reference log-probs are not precomputed (that pass runs
    outside the sharded model, which no single device may hold): TRL's per-step reference forward runs
    inside it instead. docs/multi-gpu.md says what is and is not verified."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").strip().lower() in ("1", "true")


def barrier() -> None:
    """Wait for every rank (no-op without an initialised process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
