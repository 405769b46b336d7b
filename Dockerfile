# syntax=docker/dockerfile:1
#
# ipo-align images. Two targets, built from this one file (docker-compose.yml builds both):
#
#   api     FastAPI + Alembic on python:slim. Installs the base package and the `s3` extra only
#           (`pip install ".[s3]"`: boto3, for IPO_STORAGE_URL=s3://...), so it never carries torch/CUDA:
#           the API must start fast and stay small (docs/design.md).
#   worker  Celery GPU worker on the official PyTorch CUDA image. Installs `.[worker,gpu]` WITHOUT
#           constraints/cpu.txt: that file pins the local *CPU* torch wheel for dev/CI, while the
#           image must keep the CUDA torch its base ships.
#
# The shared base is the `source` stage: the filtered project tree (.dockerignore) that both targets
# copy, so they are always built from the same code. The two runtimes cannot share an OS base because
# one of them has to be CUDA and the other must not be.
#
#   docker build --target api    -t ipo-align/api .
#   docker build --target worker -t ipo-align/worker .

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# Pick a tag whose CUDA build your driver supports (12.8 needs driver >= 570); Python must be >= 3.11.
ARG TORCH_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime

# ---------------------------------------------------------------------------------------------------
# source: the code both images install. The tree stays in /opt/ipo at runtime, and PYTHONPATH puts it
# ahead of site-packages, because app/migrate.py finds alembic.ini and migrations/ next to the `app`
# package (parent of app/), and those two are not part of the installed distribution. The install
# still provides the `ipo` entry point and every dependency. The tree is root-owned (read-only to the
# service user); only /opt/ipo/var, the embedded-default state/scratch dir, is writable.
FROM scratch AS source
COPY . /opt/ipo

# ---------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS api

# PYTHONUNBUFFERED: logs reach `docker logs` immediately, not when a buffer fills or the process dies.
# PIP_*: no cache in the layer (smaller image), no network call just to nag about pip's version.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/opt/ipo \
    IPO_VAR_DIR=/opt/ipo/var \
    IPO_MODELS_DIR=/models \
    IPO_STORAGE_URL=file:///data/storage

# Fixed uid/gid so named volumes and bind mounts get predictable ownership across both images.
# Directories that become volumes are created here and owned by ipo: Docker seeds an empty named
# volume from the image directory, ownership included, so the non-root process can write to it.
RUN groupadd --system --gid 10001 ipo \
 && useradd --system --uid 10001 --gid ipo --home-dir /home/ipo --create-home --shell /usr/sbin/nologin ipo \
 && mkdir -p /data/storage /models /opt/ipo/var \
 && chown -R ipo:ipo /data /opt/ipo/var

WORKDIR /opt/ipo
COPY --from=source /opt/ipo /opt/ipo
# Base package + the `s3` extra (boto3) only: no worker extra, so no torch/transformers/trl/peft.
# The lines after it fail the build if torch crept in, and drop the in-tree build leftovers (an egg-info
# on PYTHONPATH would be a second, stale copy of the package metadata).
RUN python -m pip install ".[s3]" \
 && python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)" \
 && rm -rf build ./*.egg-info

USER ipo
EXPOSE 8000

# Liveness only (/healthz), not /readyz: a database or broker outage must not make Docker treat the
# API process itself as broken. stdlib urllib, so no curl in the image.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

ENTRYPOINT ["ipo"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "4"]

# ---------------------------------------------------------------------------------------------------
FROM ${TORCH_IMAGE} AS worker

# HF_HUB_OFFLINE: a worker only trains models that are already on disk (the mounted models dir or the
# HF cache volume); it never downloads weights mid-job, and an unreachable hub fails fast instead of
# hanging. HF_HOME points at the cache volume mounted by docker-compose.yml.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/cache/huggingface \
    PYTHONPATH=/opt/ipo \
    IPO_VAR_DIR=/opt/ipo/var \
    IPO_MODELS_DIR=/models

# Same uid/gid as the api image (see there for why the volume directories are created here).
RUN groupadd --system --gid 10001 ipo \
 && useradd --system --uid 10001 --gid ipo --home-dir /home/ipo --create-home --shell /usr/sbin/nologin ipo \
 && mkdir -p /cache/huggingface /models /opt/ipo/var \
 && chown -R ipo:ipo /cache /opt/ipo/var

WORKDIR /opt/ipo
COPY --from=source /opt/ipo /opt/ipo
# Keep the base image's CUDA torch: pin it to the version already installed, so that no dependency
# can make pip "upgrade" it to a different (or CPU-only) build. constraints/cpu.txt is NOT used here;
# constraints/worker.txt (the training stack as CI tested it, torch left out) is.
# The check after it fails the build if torch is not a CUDA build after the install.
RUN python -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/keep-base-torch.txt \
 && python -m pip install -c /tmp/keep-base-torch.txt -c constraints/worker.txt ".[worker,gpu,tracking]" \
 && python -c "import torch, sys; sys.exit(torch.version.cuda is None)" \
 && rm -rf /tmp/keep-base-torch.txt build ./*.egg-info

USER ipo

# No HEALTHCHECK: a worker serves no port; liveness is the lease/heartbeat protocol (the API's reaper
# requeues jobs of a dead worker), and compose's `restart` brings the process back.
ENTRYPOINT ["ipo"]
CMD ["worker"]
