# syntax=docker/dockerfile:1
#
# CTSR gateway: the FastAPI front end that validates uploads and queues jobs in Redis.
# CPU only. It installs the `service` extra, which has no torch, so the image stays small.
#
# Build from the repository root (docker-compose.yml does this):
#   docker build -f docker/gateway.Dockerfile -t ctsr-gateway:local .
FROM python:3.11-slim-bookworm

LABEL org.opencontainers.image.title="ctsr-gateway" \
      org.opencontainers.image.description="CTSR super-resolution HTTP gateway (FastAPI + RQ)"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed numeric uid so that file ownership is the same on every host.
RUN useradd --no-log-init --create-home --uid 10001 --user-group ctsr

WORKDIR /src
COPY . .
# `./[service]` is pip's `.[service]`: this project with its `service` extra (no torch).
# Spelled with `./` so that hadolint sees a local path and DL3013 stays on for anything else.
RUN pip install --no-cache-dir './[service]'

WORKDIR /home/ctsr
USER 10001:10001

EXPOSE 8000

# Liveness only (/readyz also needs Redis and a worker, which is not this container's health).
# The slim image has no curl: ask with the Python that is already there.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/livez', timeout=4)"]

CMD ["ctsr", "gateway", "--host", "0.0.0.0", "--port", "8000"]
