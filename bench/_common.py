"""Shared helpers for the benchmarks: machine description, percentiles, RESULTS.md rows, a live stack
(``ipo serve`` + optionally ``ipo worker`` as real processes, like tests/e2e/conftest.py), fresh
databases (SQLite file, or a new Postgres database next to ``BENCH_DATABASE_URL``) and the tiny model."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ipo_cli.processes import free_port, stop_group, wait_http_ok

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS.md"
BENCH_RUN = secrets.token_hex(3)


# ---------------------------------------------------------------------------------------------- machine


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "?"
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))  # type: ignore[union-attr]
        ram = f"{kb / 1024 / 1024:.0f} GiB"
    except (OSError, AttributeError):
        pass
    gpu = ""
    try:
        import torch  # only when already importable (train benchmarks); the API benches never need it

        if "torch" in sys.modules and torch.cuda.is_available():
            gpu = f", GPU {torch.cuda.get_device_name(0)}"
    except Exception:
        pass
    return f"{os.cpu_count()} x {cpu}, {ram} RAM{gpu}"


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def command_line() -> str:
    rel = os.path.relpath(sys.argv[0], ROOT) if sys.argv[0] else "?"
    if rel.endswith(".py") and rel.startswith("bench/"):
        rel = "-m " + rel[:-3].replace("/", ".")
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(os.environ.items()) if k.startswith("BENCH_"))
    return (env + " " if env else "") + "python " + rel + ("" if len(sys.argv) < 2 else " " + shlex.join(sys.argv[1:]))


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(q / 100 * len(s) + 0.5) - 1))
    return s[k]


# ---------------------------------------------------------------------------------------------- results


def record(section: str, key: str, cells: dict[str, str]) -> None:
    """Add (or replace, same ``key``) a row in ``section`` of bench/RESULTS.md and print it.

    Each section is a Markdown table between ``<!-- begin NAME -->`` and ``<!-- end NAME -->``; the
    columns come from the first row written. ``key`` identifies a row (usually the exact command +
    machine), so re-running a benchmark updates its row instead of piling up duplicates.
    """
    cells = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "load (1/5/15 min)": loadavg(),
        "command": f"`{command_line()}`",
        **cells,
    }
    print(f"\n[{section}] " + "; ".join(f"{k}: {v}" for k, v in cells.items()))
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Benchmark results\n"
    begin, end = f"<!-- begin {section} -->", f"<!-- end {section} -->"
    row_key = f"<!-- key: {hashlib.sha1((key + cells['machine']).encode()).hexdigest()[:12]} -->"
    row = "| " + " | ".join(v.replace("|", "\\|").replace("\n", " ") for v in cells.values()) + f" | {row_key}"
    if begin not in text:
        header = "| " + " | ".join(cells) + " | |\n|" + "---|" * (len(cells) + 1)
        text = text.rstrip("\n") + f"\n\n### {section}\n\n{begin}\n{header}\n{end}\n"
    head, rest = text.split(begin, 1)
    body, tail = rest.split(end, 1)
    lines = [ln for ln in body.strip("\n").splitlines() if row_key not in ln]
    lines.append(row)
    RESULTS.write_text(head + begin + "\n" + "\n".join(lines) + "\n" + end + tail, encoding="utf-8")


def wait_for_quiet(max_load: float = 1.2, budget_s: float = 0.0) -> None:
    """Optionally wait (``BENCH_WAIT_QUIET=seconds``) until the 1-minute load average drops below ``max_load``."""
    budget_s = budget_s or float(os.environ.get("BENCH_WAIT_QUIET", "0"))
    deadline = time.monotonic() + budget_s
    while os.getloadavg()[0] >= max_load and time.monotonic() < deadline:
        print(f"load {loadavg()}: waiting for < {max_load}", flush=True)
        time.sleep(30)


# ---------------------------------------------------------------------------------------------- model


def tiny_model_dir() -> Path:
    """A directory holding ``tiny-mistral``: ``IPO_TEST_TINY_MODEL``, the tests' cache, or built here."""
    prebuilt = os.environ.get("IPO_TEST_TINY_MODEL")
    if prebuilt:
        return Path(prebuilt).resolve()
    from worker.training import demo_data, tiny

    digest = hashlib.sha256(Path(tiny.__file__).read_bytes() + Path(demo_data.__file__).read_bytes()).hexdigest()[:16]
    cached = ROOT / ".cache" / "test-models" / digest / "tiny-mistral"
    if (cached / "config.json").exists():
        return cached
    out = ROOT / ".cache" / "bench-models" / digest / "tiny-mistral"
    if not (out / "config.json").exists():
        print(f"building the tiny model into {out} ...", flush=True)
        (ROOT / ".cache").mkdir(exist_ok=True)  # a fresh clone has none
        staging = Path(tempfile.mkdtemp(prefix="building-", dir=ROOT / ".cache"))
        tiny.build_tiny_model(staging / "tiny-mistral", seed=0)
        out.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):  # another run finished first
            (staging / "tiny-mistral").rename(out)
        shutil.rmtree(staging, ignore_errors=True)
    return out


def models_dir_with(model: Path, parent: Path) -> Path:
    models = parent / "models"
    models.mkdir(parents=True, exist_ok=True)
    copy = models / "tiny-mistral"
    if not copy.exists():  # a copy, not a symlink: the worker refuses model paths that resolve elsewhere
        shutil.copytree(model, copy)
    return models


# ---------------------------------------------------------------------------------------------- databases


@contextmanager
def fresh_database(tmp: Path, name: str) -> Iterator[str]:
    """SQLite file in ``tmp``, or a fresh Postgres database next to ``BENCH_DATABASE_URL`` (dropped after)."""
    base = os.environ.get("BENCH_DATABASE_URL")
    if not base:
        yield f"sqlite:///{tmp / (name + '.db')}"
        return
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    db = f"bench_{name}_{BENCH_RUN}"
    admin = create_engine(make_url(base), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{db}"'))
    try:
        yield make_url(base).set(database=db).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
        admin.dispose()


def db_kind() -> str:
    return "postgres" if os.environ.get("BENCH_DATABASE_URL") else "sqlite"


def redis_url() -> str | None:
    """``BENCH_REDIS_URL`` with a private db number (1-15) for this run, or None (filesystem broker)."""
    base = os.environ.get("BENCH_REDIS_URL")
    if not base:
        return None
    return base.rsplit("/", 1)[0] + f"/{int(BENCH_RUN, 16) % 15 + 1}"


# ---------------------------------------------------------------------------------------------- stack


def start_process(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)


stop_process = stop_group  # the same SIGTERM-then-SIGKILL of a process group the service uses


def wait_http(url: str, procs: list[subprocess.Popen[bytes]], log_hint: Path, timeout: float = 60) -> None:
    try:
        wait_http_ok(url, procs, timeout)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}; see {log_hint}") from exc


def wait_log(log: Path, pattern: str, proc: subprocess.Popen[bytes], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited early ({proc.returncode}); see {log}")
        if log.exists() and re.search(pattern, log.read_text(errors="replace")):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{pattern!r} not in {log} after {timeout}s")


@dataclass
class Stack:
    url: str
    api_key: str
    worker_token: str
    env: dict[str, str]
    tmp: Path
    database_url: str
    api: subprocess.Popen[bytes]
    worker: subprocess.Popen[bytes] | None = None
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    @property
    def internal_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.worker_token}"}


@contextmanager
def stack(
    name: str,
    *,
    worker: bool = False,
    api_env: dict[str, str] | None = None,
    worker_env: dict[str, str] | None = None,
    model: Path | None = None,
) -> Iterator[Stack]:
    """A live API (``ipo serve``) and optionally one worker (``ipo worker``), on a fresh database."""
    tmp = Path(tempfile.mkdtemp(prefix=f"ipo-bench-{name}-"))
    try:
        with fresh_database(tmp, name) as database_url:
            from app.auth import create_key
            from app.db import make_engine, make_sessionmaker
            from app.migrate import upgrade

            upgrade(database_url)
            engine = make_engine(database_url)
            with make_sessionmaker(engine)() as session, session.begin():
                _, key = create_key(session, f"bench-{name}-{BENCH_RUN}")
            engine.dispose()
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            token = "bench-worker-token-" + BENCH_RUN
            env = {
                **os.environ,
                "IPO_DATABASE_URL": database_url,
                "IPO_VAR_DIR": str(tmp / "var"),
                "IPO_MODELS_DIR": str(models_dir_with(model or tiny_model_dir(), tmp)),
                "IPO_WORKER_TOKEN": token,
                "IPO_API_URL": url,
                "IPO_QUEUE": f"ipo.jobs.bench-{BENCH_RUN}",
                "IPO_RATE_LIMIT_PER_MINUTE": "0",
                "IPO_MAX_ACTIVE_JOBS": "0",
                "IPO_RUN_WEBHOOK_SENDER": "false",
                "HF_HUB_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false",
                "PYTHONUNBUFFERED": "1",
            }
            rurl = redis_url()
            if rurl:
                env["IPO_BROKER_URL"] = rurl
            logs = tmp / "logs"
            logs.mkdir()
            api = start_process(
                [sys.executable, "-m", "ipo_cli.main", "serve", "--port", str(port)],
                {**env, **(api_env or {})},
                logs / "api.log",
            )
            st = Stack(url=url, api_key=key, worker_token=token, env=env, tmp=tmp, database_url=database_url, api=api)
            st.procs.append(api)
            try:
                wait_http(f"{url}/readyz", [api], logs / "api.log")
                if worker:
                    st.worker = start_process(
                        [sys.executable, "-m", "ipo_cli.main", "worker"],
                        {**env, **(worker_env or {})},
                        logs / "worker.log",
                    )
                    st.procs.append(st.worker)
                    wait_log(logs / "worker.log", r"\bready\b", st.worker)
                yield st
            finally:
                for p in reversed(st.procs):
                    stop_process(p, 90)
    finally:
        if os.environ.get("BENCH_KEEP_TMP"):
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
