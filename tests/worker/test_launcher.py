"""The parts of a job on several devices that need no training: the device pool, the launch command, the
queues a worker consumes, and how a dead rank is told apart (the real runs are in test_multi_gpu.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from contracts.internal import DEFAULT_QUEUE, queue_for, worker_queues
from worker.celery_app import worker_argv
from worker.launcher import DevicePool, DevicesBusy, launch_argv, parse_devices
from worker.outcome import AttemptFacts, decide, is_retryable
from worker.settings import WorkerSettings
from worker.trainer_process import TrainerProcess
from worker.training.distributed import process_start_time


def test_declared_devices_are_ids_or_a_count() -> None:
    assert parse_devices(None) == parse_devices(" ") == []
    assert parse_devices("0,1, 3") == ["0", "1", "3"]
    assert parse_devices("4") == ["0", "1", "2", "3"]
    assert parse_devices("GPU-8a1b2c3d-0000-1111") == ["GPU-8a1b2c3d-0000-1111"]
    for bad in ("0,0", "0;1", "../x"):
        with pytest.raises(ValueError, match="IPO_WORKER_GPUS"):
            parse_devices(bad)
    with pytest.raises(ValueError):  # a worker with a malformed list does not start
        WorkerSettings(worker_gpus="1,1")


def test_jobs_go_to_the_queue_of_their_device_count_and_workers_consume_up_to_theirs(tmp_path: Path) -> None:
    assert queue_for("ipo.jobs", 1) == "ipo.jobs" and queue_for("ipo.jobs", 4) == "ipo.jobs.gpus-4"
    with pytest.raises(ValueError):
        queue_for("ipo.jobs", 0)
    assert worker_queues("q", 1) == ["q"] and worker_queues("q", 3) == ["q", "q.gpus-2", "q.gpus-3"]
    assert WorkerSettings(var_dir=tmp_path).queues == [DEFAULT_QUEUE]  # nothing declared: one device
    four = WorkerSettings(var_dir=tmp_path, queue="t", worker_gpus="0,1,2,3")
    assert four.queues == ["t", "t.gpus-2", "t.gpus-3", "t.gpus-4"]
    assert "--queues=t,t.gpus-2,t.gpus-3,t.gpus-4" in worker_argv(four)


def test_the_pool_hands_out_each_device_once_across_processes(tmp_path: Path) -> None:
    pool = DevicePool(["0", "1", "2"], tmp_path / "locks")
    first = pool.try_reserve(2)
    assert first is not None and first.cuda_visible_devices == "0,1"
    assert pool.try_reserve(2) is None  # one left
    with pytest.raises(ValueError, match="declares 3"):
        pool.try_reserve(4)
    with pytest.raises(DevicesBusy, match="not free within"):
        pool.reserve(2, wait_seconds=0.2, poll_seconds=0.05)
    first.release()
    # another worker process on the host holds device 0 (flock is per open file: a process is enough)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
            str(tmp_path / "locks" / "0.lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pool.reserve(2, wait_seconds=0) as second:
            assert second.ids == ["1", "2"]
        holder.kill()  # a worker that dies frees its devices
        holder.wait()
        with pool.reserve(3, wait_seconds=0) as third:
            assert third.ids == ["0", "1", "2"]
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_the_launch_command_is_accelerate_with_one_process_per_device(tmp_path: Path) -> None:
    trainer = (sys.executable, "-m", "worker.training.run")
    argv = launch_argv(trainer, 4, device="cuda", port=29999)
    assert argv[:4] == [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    assert argv[argv.index("--num_processes") + 1] == "4" and argv[argv.index("--main_process_port") + 1] == "29999"
    assert argv[-2:] == ["-m", "worker.training.run"] and "--num_cpu_threads_per_process" not in argv
    cpu = launch_argv(trainer, 2, device="cpu", port=1)
    assert "--num_cpu_threads_per_process" in cpu  # gloo ranks share the host's cores
    fsdp = launch_argv(trainer, 2, device="cuda", port=1, config_file=tmp_path / "fsdp.yaml")
    assert fsdp[3:5] == ["--config_file", str(tmp_path / "fsdp.yaml")] and "--multi_gpu" not in fsdp
    with pytest.raises(ValueError):
        launch_argv(trainer, 1, device="cpu", port=1)


def test_a_rank_that_recorded_no_exit_fails_the_attempt_as_retryable() -> None:
    lost = AttemptFacts(returncode=1, lost_ranks=(1,), n_processes=2)
    outcome = decide(lost)
    assert (outcome.status, outcome.reason) == ("failed", "rank_died")
    assert outcome.message and outcome.message.startswith("Rank 1 of 2 training processes died")
    assert is_retryable(outcome, lost)
    # ahead of rank 0's own error, which the lost peer caused
    from contracts.internal import TrainerReport

    error = TrainerReport(kind="error", code="internal_error", message="Connection closed by peer")
    both = AttemptFacts(returncode=1, lost_ranks=(1,), n_processes=2, error=error)
    assert decide(both).reason == "rank_died" and is_retryable(decide(both), both)
    # a stop the worker asked for stays a stop, whatever the ranks did
    paused = AttemptFacts(returncode=1, lost_ranks=(0, 1), n_processes=2, stop_reason="paused")
    assert decide(paused).status == "stopped"
    # every rank recorded its exit: rank 0's error decides, as for one process
    assert decide(AttemptFacts(returncode=1, error=error, n_processes=2)).reason == "internal_error"


def test_rank_records_name_live_processes_only(tmp_path: Path) -> None:
    trainer = TrainerProcess(["true"], tmp_path / "r.json", tmp_path, stop_grace_seconds=1, n_processes=2)
    ranks = tmp_path / "ranks"
    ranks.mkdir()
    me = os.getpid()
    (ranks / "rank-0.json").write_text(json.dumps({"rank": 0, "pid": me, "start_time": process_start_time(me)}))
    # a pid the kernel gave to another process since: its start time differs
    stale = {"rank": 1, "pid": me, "start_time": (process_start_time(me) or 0) + 1}
    (ranks / "rank-1.json").write_text(json.dumps(stale))
    (ranks / "rank-0.exit.json").write_text(json.dumps({"rank": 0, "exit_code": 1, "error": None}))
    assert trainer.ranks() == {0: me}
    assert trainer.lost_ranks() == [1]
    assert TrainerProcess(["true"], tmp_path / "r.json", tmp_path, stop_grace_seconds=1).lost_ranks() == []
