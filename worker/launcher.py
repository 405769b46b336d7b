"""How a job that trains on several devices is started: ``accelerate launch`` around the trainer, and the
per-host pool of devices the worker reserves them from.

- :func:`launch_argv`: ``python -m accelerate.commands.launch --num_processes N ... -m worker.training.run``.
  On CUDA ``--multi_gpu`` (DDP over NCCL), or the worker's accelerate config file
  (``IPO_ACCELERATE_CONFIG``: FSDP, docs/multi-gpu.md); on CPU the same ``--multi_gpu`` launcher with the
  trainer on CPU, which makes accelerate use the gloo backend (``accelerate launch --cpu`` would start
  one process, or need MPI, for N > 1).
- :class:`DevicePool`: the devices a worker declares (``IPO_WORKER_GPUS``), shared by every worker process
  on the host through one lock file per device under ``IPO_DEVICE_LOCK_DIR``: ``flock`` locks, so a
  worker that dies frees its devices with its last descriptor, and two workers never hand out the same one.
  A reservation becomes the trainer's ``CUDA_VISIBLE_DEVICES``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path

LAUNCH_MODULE = "accelerate.commands.launch"


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now (the run's rendezvous port; the OS may hand
    it out again before torch binds it, which fails that attempt with ``EADDRINUSE``: rare, and retryable)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_argv(
    trainer_argv: Sequence[str],
    n_processes: int,
    *,
    device: str,
    port: int,
    config_file: Path | None = None,
) -> list[str]:
    """The command that runs ``trainer_argv`` (``[python, "-m", module]`` or ``[python, script]``) as
    ``n_processes`` data-parallel ranks on one host.

    ``device`` is the worker's ``IPO_DEVICE`` (``cpu`` runs the ranks on CPU with gloo; ``auto``/``cuda``
    one rank per visible CUDA device). ``config_file``: an ``accelerate config`` file (FSDP and the like)
    used instead of ``--multi_gpu``; ``--num_processes`` still comes from the job. Raises ``ValueError`` for
    fewer than 2 processes (one trains without a launcher) or an argv that is not a Python command.
    """
    if n_processes < 2:
        raise ValueError(f"accelerate launch is for 2 or more processes, got {n_processes}")
    if len(trainer_argv) < 2:
        raise ValueError(f"not a python command: {list(trainer_argv)}")
    python, *script = trainer_argv
    mode = ["--config_file", str(config_file)] if config_file is not None else ["--multi_gpu"]
    threads = ["--num_cpu_threads_per_process", str(max(1, (os.cpu_count() or 1) // n_processes))]
    return [
        python,
        "-m",
        LAUNCH_MODULE,
        *mode,
        "--num_processes",
        str(n_processes),
        "--num_machines",
        "1",
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(port),
        "--mixed_precision",
        "no",  # the trainer's TrainingArguments choose (bf16 on CUDA, fp32 on CPU)
        "--dynamo_backend",
        "no",
        *(threads if device == "cpu" else []),
        *script,
    ]


def parse_devices(declared: str | None) -> list[str]:
    """``IPO_WORKER_GPUS`` as device ids: ``"0,1,2,3"`` -> ``["0", "1", "2", "3"]``; a count ``"4"`` stands for
    ``0..3``; None or empty for none declared (the worker trains on one device and reserves nothing). Raises
    ``ValueError`` for an id that repeats or is not ``[A-Za-z0-9_-]`` (a GPU index or UUID)."""
    if declared is None or not declared.strip():
        return []
    text = declared.strip()
    if "," not in text and text.isdigit():
        ids = [str(i) for i in range(int(text))]
    else:
        ids = [part.strip() for part in text.split(",") if part.strip()]
    for device in ids:
        if not device.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"IPO_WORKER_GPUS: {device!r} is not a device index or UUID")
    if len(set(ids)) != len(ids):
        raise ValueError(f"IPO_WORKER_GPUS names a device twice: {declared!r}")
    return ids


class DevicesBusy(Exception):
    """Not enough of the worker's devices were free within the wait."""


class Reservation:
    """Devices held for one attempt (their ``flock`` locks); :meth:`release` (or closing the descriptors by
    exiting) frees them."""

    def __init__(self, ids: list[str], fds: list[int]) -> None:
        self.ids = ids
        self._fds = fds

    @property
    def cuda_visible_devices(self) -> str:
        """The reserved ids, comma-separated: the trainer's ``CUDA_VISIBLE_DEVICES``."""
        return ",".join(self.ids)

    def release(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)  # closing the last descriptor drops the flock
        self._fds = []

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class DevicePool:
    """The declared ``devices`` of this host, locked through ``lock_dir/{id}.lock`` (see module doc)."""

    def __init__(self, devices: Sequence[str], lock_dir: Path) -> None:
        self.devices = list(devices)
        self.lock_dir = Path(lock_dir)

    def try_reserve(self, n: int) -> Reservation | None:
        """``n`` free devices (in declared order), or None when fewer are free now. Raises ``ValueError`` when
        the pool has fewer than ``n`` devices at all."""
        if n > len(self.devices):
            raise ValueError(f"{n} devices asked for, but this worker declares {len(self.devices)}")
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        ids: list[str] = []
        fds: list[int] = []
        for device in self.devices:
            if len(ids) == n:
                break
            fd = os.open(self.lock_dir / f"{device}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            ids.append(device)
            fds.append(fd)
        if len(ids) < n:
            Reservation(ids, fds).release()
            return None
        return Reservation(ids, fds)

    def reserve(
        self,
        n: int,
        *,
        wait_seconds: float,
        poll_seconds: float = 1.0,
        while_waiting: Callable[[], None] | None = None,
    ) -> Reservation:
        """``n`` devices, waiting up to ``wait_seconds`` for other jobs on this host to free them, calling
        ``while_waiting`` (the worker heartbeats its lease there) between tries. Raises ``DevicesBusy`` after
        the wait, ``ValueError`` when the pool is too small."""
        deadline = time.monotonic() + wait_seconds
        while True:
            reservation = self.try_reserve(n)
            if reservation is not None:
                return reservation
            if time.monotonic() >= deadline:
                raise DevicesBusy(
                    f"{n} of this worker's devices ({', '.join(self.devices)}) were not free within "
                    f"{wait_seconds:g}s (other jobs on the host hold them)"
                )
            if while_waiting is not None:
                while_waiting()
            time.sleep(poll_seconds)
