"""Structural checks of the deployment files: docker-compose.yml, Dockerfile, .dockerignore, .ci/run.

No Docker engine runs in CI, so these tests pin down what would otherwise only fail on a GPU host at
deploy time: a missing GPU reservation, an API image that drags in torch, a migration that is not a
one-shot, a worker token with a default. When a compose binary is on PATH, `config` also validates the
file the way Compose itself reads it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
CI_RUN = ROOT / ".ci" / "run"

IPO_SERVICES = ("migrate", "api-1", "api-2", "dispatcher", "worker", "worker-multi")
API_REPLICAS = ("api-1", "api-2")
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"


# --------------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose["services"]
    return result


def _depends_on(service: dict[str, Any]) -> dict[str, str]:
    """depends_on as {service: condition}; the short list form means `service_started`."""
    raw = service.get("depends_on", {})
    if isinstance(raw, list):
        return {name: "service_started" for name in raw}
    return {name: spec.get("condition", "service_started") for name, spec in raw.items()}


def _healthcheck_text(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else str(test)


def _gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    devices: list[dict[str, Any]] = (
        service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    )
    return devices


def _dockerfile_stages() -> dict[str, str]:
    """Stage name -> the stage's text (from its FROM line up to the next FROM), line continuations joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: dict[str, str] = {}
    current: str | None = None
    for line in text.splitlines():
        match = re.match(r"^FROM\s+\S+(?:\s+AS\s+(\S+))?", line, flags=re.IGNORECASE)
        if match:
            current = match.group(1) or f"<unnamed {len(stages)}>"
            stages[current] = ""
        if current is not None and not line.lstrip().startswith("#"):
            stages[current] += line + "\n"
    return stages


def _pip_installs(stage_text: str) -> list[str]:
    """The arguments of every `pip install` in a stage (up to the next `&&`, `;` or end of line)."""
    return [args.strip() for args in re.findall(r"\bpip install\s+([^&;\n]*)", stage_text)]


# --------------------------------------------------------------------------------------------------
# docker-compose.yml


def test_compose_has_no_obsolete_version_key(compose: dict[str, Any]) -> None:
    # `version:` is obsolete in Compose v2 and not needed by docker-compose 1.29 for the spec format.
    assert "version" not in compose


def test_required_services_present(services: dict[str, dict[str, Any]]) -> None:
    assert {"postgres", "redis", "minio", "minio-init", "migrate", "lb", "worker", *API_REPLICAS} <= services.keys()


def test_shared_env_anchor_reaches_every_ipo_service(compose: dict[str, Any], services: dict[str, Any]) -> None:
    shared = compose["x-ipo-env"]
    for key in (
        "IPO_BROKER_URL",
        "IPO_API_URL",
        "IPO_WORKER_TOKEN",
        "IPO_MODELS_DIR",
        "IPO_HEARTBEAT_SECONDS",
        "IPO_LEASE_SECONDS",
        "IPO_MAX_ATTEMPTS",
    ):
        assert key in shared, key
    for name in IPO_SERVICES:
        env = services[name]["environment"]
        for key, value in shared.items():
            assert env.get(key) == value, f"{name} lacks shared {key}"


def test_worker_token_has_no_default(compose: dict[str, Any]) -> None:
    # `${VAR:?msg}` makes compose refuse to start without it; a default would be a shared secret in git.
    assert re.fullmatch(r"\$\{IPO_WORKER_TOKEN:\?[^}]+\}", compose["x-ipo-env"]["IPO_WORKER_TOKEN"])


def test_only_api_side_gets_ledger_credentials(services: dict[str, dict[str, Any]]) -> None:
    # docs/design.md: app/ is the only process that writes the database; a worker needs no DB credentials.
    for name in ("migrate", "dispatcher", *API_REPLICAS):
        url = services[name]["environment"]["IPO_DATABASE_URL"]
        assert url.startswith("postgresql+psycopg://") and "@postgres:5432/" in url
        assert "${POSTGRES_PASSWORD:-" in url  # from the environment, with a local default
    for name in ("worker", "worker-multi"):
        assert not {k for k in services[name]["environment"] if k.startswith(("IPO_DATABASE", "IPO_STORAGE", "AWS_"))}
    for name in API_REPLICAS:
        env = services[name]["environment"]
        # One object store for every replica (MinIO by default), one Redis for the broker and rate limit.
        assert env["IPO_STORAGE_URL"] == "${IPO_STORAGE_URL:-s3://ipo-artifacts/prod}"
        assert env["AWS_ENDPOINT_URL"].endswith("http://minio:9000}")
        assert env["IPO_BROKER_URL"].startswith("redis://redis:6379")


def test_postgres_and_redis_have_healthchecks_and_postgres_a_volume(services: dict[str, dict[str, Any]]) -> None:
    assert "pg_isready" in _healthcheck_text(services["postgres"])
    assert "ping" in _healthcheck_text(services["redis"])
    assert any(str(v).endswith(":/var/lib/postgresql/data") for v in services["postgres"]["volumes"])
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:-")


def test_migrate_is_a_one_shot(services: dict[str, dict[str, Any]]) -> None:
    migrate = services["migrate"]
    assert migrate["command"] == ["migrate"]
    assert migrate["restart"] == "no"
    assert _depends_on(migrate) == {"postgres": "service_healthy"}
    assert migrate["build"]["target"] == "api"  # alembic lives in the small image
    assert "ports" not in migrate


def test_two_api_replicas_of_one_definition(services: dict[str, dict[str, Any]]) -> None:
    first, second = (services[name] for name in API_REPLICAS)
    assert first == second  # the same definition (x-api): any replica serves any request
    api = first
    assert api["build"]["target"] == "api"
    assert api["command"] == ["serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "${IPO_API_WORKERS:-2}"]
    deps = _depends_on(api)
    assert deps["migrate"] == "service_completed_successfully"
    assert deps["minio-init"] == "service_completed_successfully"  # the bucket exists before the first upload
    assert deps["redis"] == "service_healthy" and deps["postgres"] == "service_healthy"
    assert "/healthz" in _healthcheck_text(api)
    assert "ports" not in api  # reached through the load balancer only
    assert "adapters:/data/adapters" in api["volumes"]  # unpacked adapters, shared with the inference server
    assert any(str(v).endswith(":/models:ro") for v in api["volumes"])


def test_the_singleton_loops_run_in_their_own_service(services: dict[str, dict[str, Any]]) -> None:
    dispatcher = services["dispatcher"]
    assert dispatcher["command"] == ["dispatcher"]
    assert dispatcher["build"]["target"] == "api"  # app/ code, no torch
    assert _depends_on(dispatcher) == {
        "migrate": "service_completed_successfully",
        "postgres": "service_healthy",
        "redis": "service_healthy",
    }
    assert dispatcher["restart"] == "unless-stopped" and "ports" not in dispatcher
    for name in API_REPLICAS:  # so the replicas leave the loops to it
        env = services[name]["environment"]
        assert env["IPO_RUN_DISPATCHER"] == "false" and env["IPO_RUN_WEBHOOK_SENDER"] == "false"
    assert "IPO_RUN_DISPATCHER" not in dispatcher["environment"]


def _haproxy_servers() -> list[str]:
    """The ``server NAME "${VAR}"`` lines of the balancer's config, as the env var names they read."""
    return re.findall(r'^\s*server\s+\S+\s+"\$\{(\w+)\}"', HAPROXY_CFG.read_text(), flags=re.MULTILINE)


def test_load_balancer_fronts_every_replica(compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    lb = services["lb"]
    assert lb["image"].startswith("haproxy:")
    assert "./deploy/haproxy/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in lb["volumes"]
    assert any(str(p).endswith(":8000") for p in lb["ports"]) and lb["environment"]["IPO_LB_PORT"] == "8000"
    # Every server line of the config is given a replica, and every replica is a server.
    targets = {lb["environment"][var] for var in _haproxy_servers()}
    assert targets == {f"{name}:8000" for name in API_REPLICAS}
    assert set(_depends_on(lb)) == set(API_REPLICAS)  # started, not healthy: it routes around a dead one
    # Workers report through the balancer, so any live replica takes their reports.
    assert compose["x-ipo-env"]["IPO_API_URL"] == "http://lb:8000"
    cfg = HAPROXY_CFG.read_text()
    assert "option httpchk GET /readyz" in cfg  # a dead or unready replica leaves the rotation
    assert "http-buffer-request" not in cfg  # bodies and event streams pass unbuffered


needs_haproxy = pytest.mark.skipif(
    shutil.which("haproxy") is None, reason="no haproxy binary (apt-get install haproxy)"
)


@needs_haproxy
def test_haproxy_accepts_the_config() -> None:
    env = {**os.environ, "IPO_LB_PORT": "8000", **{var: "127.0.0.1:8000" for var in _haproxy_servers()}}
    done = subprocess.run(
        ["haproxy", "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_worker_service(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    assert worker["build"]["target"] == "worker"
    assert worker["command"] == ["worker"]
    assert _depends_on(worker)["lb"] == "service_started"
    env = worker["environment"]
    assert env["CUDA_VISIBLE_DEVICES"] == "0"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert any(str(v).endswith(":/models:ro") for v in worker["volumes"])
    assert any(str(v).startswith("hf-cache:") for v in worker["volumes"])
    assert "ports" not in worker


def test_worker_reserves_exactly_one_gpu(services: dict[str, dict[str, Any]]) -> None:
    assert _gpu_devices(services["worker"]) == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_workers_for_one_and_for_several_gpus_never_share_a_gpu(services: dict[str, dict[str, Any]]) -> None:
    workers = {n: s for n, s in services.items() if s.get("build", {}).get("target") == "worker"}
    assert {"worker", "worker-multi"} <= workers.keys()
    claimed: list[str] = []
    for name, svc in workers.items():
        (device,) = _gpu_devices(svc)
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"], name
        # Docker rejects count together with device_ids; count N means device indices 0..N-1.
        assert ("count" in device) != ("device_ids" in device), name
        ids = [str(i) for i in range(device["count"])] if "count" in device else device["device_ids"]
        env = svc["environment"]
        # The container sees its reserved GPUs as 0..n-1, and declares that many (its job queues follow).
        assert env["CUDA_VISIBLE_DEVICES"] == ",".join(str(i) for i in range(len(ids))), name
        assert int(env.get("IPO_WORKER_GPUS", "1")) == len(ids), name
        claimed += ids
        if name != "worker":
            assert svc.get("profiles"), f"{name} must be opt-in (a profile), not start on 1-GPU hosts"
    assert len(claimed) == len(set(claimed)), f"two workers share a GPU: {claimed}"
    assert len(_gpu_devices(workers["worker-multi"])[0]["device_ids"]) >= 2


def test_minio_is_the_default_store_and_its_bucket_is_made_first(services: dict[str, dict[str, Any]]) -> None:
    for name in ("minio", "minio-init"):
        assert "profiles" not in services[name], name
    assert _depends_on(services["minio-init"]) == {"minio": "service_healthy"}
    assert "mc mb --ignore-existing local/ipo-artifacts" in " ".join(services["minio-init"]["command"])
    assert services["minio-init"]["restart"] == "no"


def test_named_volumes_declared(compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    declared = set(compose["volumes"])
    assert {"pg-data", "adapters", "hf-cache", "minio-data"} <= declared
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            source = str(volume).split(":", 1)[0]
            if not source.startswith(("/", ".", "$")):
                assert source in declared, f"{name} uses undeclared volume {source}"


def _compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


COMPOSE_CMD = _compose_command()
needs_compose = pytest.mark.skipif(
    COMPOSE_CMD is None,
    reason="no compose binary on PATH (apt-get install docker-compose, or the docker compose plugin)",
)


def _run_compose_config(extra_env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    assert COMPOSE_CMD is not None
    env = {k: v for k, v in os.environ.items() if k != "IPO_WORKER_TOKEN"} | extra_env
    # --project-directory pins where `.env` would be read from; the repo has none, so results are
    # independent of the developer's local secrets.
    return subprocess.run(
        [*COMPOSE_CMD, "-f", str(COMPOSE_FILE), "--project-directory", str(ROOT), *args, "config"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


@needs_compose
def test_compose_config_accepts_file_with_all_profiles() -> None:
    done = _run_compose_config({"IPO_WORKER_TOKEN": "test-token"}, "--profile", "multi-gpu")
    assert done.returncode == 0, done.stderr
    rendered = yaml.safe_load(done.stdout)
    expected = {"postgres", "redis", "minio", "minio-init", "migrate", "lb", "worker", "worker-multi", *API_REPLICAS}
    assert expected <= rendered["services"].keys()
    for name in API_REPLICAS:
        api = rendered["services"][name]
        assert api["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert api["command"][-2:] == ["--workers", "2"]
        assert api["environment"]["IPO_STORAGE_URL"] == "s3://ipo-artifacts/prod"
    assert rendered["services"]["worker-multi"]["environment"]["IPO_WORKER_TOKEN"] == "test-token"


@needs_compose
def test_compose_config_refuses_missing_worker_token() -> None:
    if (ROOT / ".env").exists():
        pytest.skip("a local .env may define IPO_WORKER_TOKEN")
    done = _run_compose_config({})
    assert done.returncode != 0
    assert "IPO_WORKER_TOKEN" in done.stderr


# --------------------------------------------------------------------------------------------------
# Dockerfile


def test_dockerfile_targets() -> None:
    stages = _dockerfile_stages()
    assert {"source", "api", "worker"} <= stages.keys()


def test_api_image_installs_base_package_only() -> None:
    api = _dockerfile_stages()["api"]
    # Exactly `pip install ".[s3]"`: no worker extra (the worker extra is what pulls torch), no
    # constraints, and no direct install of anything else.
    assert _pip_installs(api) == ['".[s3]"']


def test_worker_image_installs_worker_gpu_and_tracking_extras_keeping_cuda_torch() -> None:
    worker = _dockerfile_stages()["worker"]
    installs = _pip_installs(worker)
    assert len(installs) == 1 and installs[0].endswith('".[worker,gpu,tracking]"'), installs
    # constraints/cpu.txt pins the CPU torch wheel; the worker image keeps its base's CUDA torch.
    assert "constraints/cpu.txt" not in worker
    assert re.search(r"^FROM\s+\$\{TORCH_IMAGE\}", worker, flags=re.MULTILINE)
    assert re.search(r"^ARG TORCH_IMAGE=pytorch/pytorch:\S+-cuda", DOCKERFILE.read_text(), flags=re.MULTILINE)


def test_base_dependencies_pull_no_training_stack() -> None:
    # `pip install .` in the api image is only torch-free while the base dependencies are.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[\s\[<>=!~;]", dep, maxsplit=1)[0].lower() for dep in project["dependencies"]}
    assert not names & {"torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "mlflow", "wandb"}
    extras = project["optional-dependencies"]
    assert any(dep.startswith("torch") for dep in extras["worker"])
    assert any(dep.startswith("bitsandbytes") for dep in extras["gpu"])
    # The api image also installs the s3 extra: object-store client only.
    assert [re.split(r"[\s\[<>=!~;]", dep, maxsplit=1)[0].lower() for dep in extras["s3"]] == ["boto3"]


@pytest.mark.parametrize("stage", ["api", "worker"])
def test_runtime_stages_are_non_root_unbuffered_and_enter_via_ipo(stage: str) -> None:
    text = _dockerfile_stages()[stage]
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.MULTILINE)
    assert users and users[-1] not in ("root", "0"), users
    assert "PYTHONUNBUFFERED=1" in text
    # app/migrate.py finds alembic.ini + migrations/ beside the `app` package: the source tree must win.
    assert "PYTHONPATH=/opt/ipo" in text
    assert re.search(r'^ENTRYPOINT \["ipo"\]', text, flags=re.MULTILINE)


def test_worker_runs_hub_offline_and_api_has_healthcheck() -> None:
    stages = _dockerfile_stages()
    assert "HF_HUB_OFFLINE=1" in stages["worker"]
    assert "HF_HUB_OFFLINE" not in stages["api"]
    healthcheck = re.search(r"^HEALTHCHECK .*$", stages["api"], flags=re.MULTILINE)
    assert healthcheck and "urllib.request" in healthcheck.group(0) and "/healthz" in healthcheck.group(0)


def test_dockerignore_keeps_local_state_and_secrets_out() -> None:
    entries = {line.strip() for line in DOCKERIGNORE.read_text().splitlines()}
    assert {".git", ".venv", "var", ".env"} <= entries
    # pyproject.toml names README.md as the readme; the build fails without it.
    assert "!README.md" in entries


# --------------------------------------------------------------------------------------------------
# .ci/run


def test_ci_script_is_strict_executable_bash() -> None:
    text = CI_RUN.read_text()
    assert text.startswith(("#!/usr/bin/env bash\n", "#!/bin/bash\n"))
    assert "set -euo pipefail" in text
    assert os.access(CI_RUN, os.X_OK)


def test_ci_script_uses_the_makefile_entry_points() -> None:
    text = CI_RUN.read_text()
    for needle in (
        "make venv",
        "make test",
        "make test-slow",
        "TEST_DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/test",
        "TEST_REDIS_URL=redis://127.0.0.1:6379/0",
    ):
        assert needle in text, needle


def test_vllm_serves_chat_completions_with_runtime_lora_from_the_shared_adapter_store(
    services: dict[str, dict[str, Any]],
) -> None:
    vllm, api = services["vllm"], services["api-1"]
    assert vllm["profiles"] == ["vllm"]  # opt-in: a CPU host does not start it
    assert "--enable-lora" in vllm["command"] and vllm["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    (device,) = _gpu_devices(vllm)
    assert device["capabilities"] == ["gpu"]
    # The API hands vLLM an adapter's path: both must see the store at the same place.
    store = api["environment"]["IPO_ADAPTERS_DIR"]
    assert f"adapters:{store}" in api["volumes"] and f"adapters:{store}:ro" in vllm["volumes"]
    assert api["environment"]["IPO_INFERENCE_URL"].endswith("http://vllm:8000}")
    served = vllm["command"][vllm["command"].index("--served-model-name") + 1]
    assert vllm["command"][0] == f"/models/{served}"  # served name = the allow-listed directory name
    embedded = services["inference"]
    assert embedded["profiles"] == ["embedded-inference"] and f"adapters:{store}:ro" in embedded["volumes"]
