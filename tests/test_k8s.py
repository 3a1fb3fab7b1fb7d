"""deploy/k8s: every overlay builds with kustomize and every object is valid, offline.

Core kinds are checked by ``kubernetes-validate --strict`` (the API's own OpenAPI schemas; unknown
fields fail), KEDA's ScaledObject and TriggerAuthentication by KEDA's CRD schemas compiled into the
npm package pinned in ``deploy/k8s/tools/package-lock.json`` (run with node). Each checker is first
shown to reject a broken object. Then the manifests are checked against the service they deploy:
the same limits, ports, probe paths, queue name and settings. Like tests/test_deploy.py nothing
here skips for want of a tool: ``.ci/run`` installs kubectl, node and the npm package.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from ctsr.settings import Settings

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
TOOLS = K8S / "tools"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
KUBERNETES_VERSION = "1.33.0"  # the oldest minor version the manifests promise to work on

Obj = dict[str, Any]


@functools.cache
def build(overlay: str) -> tuple[Obj, ...]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed (Debian: apt-get install kubernetes-client; .ci/run does it)"
    out = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True)
    assert out.returncode == 0, f"kustomize build of {overlay} failed:\n{out.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def find(objects: tuple[Obj, ...], kind: str, name: str | None = None) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: tuple[Obj, ...], kind: str, name: str) -> Obj:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def config(objects: tuple[Obj, ...]) -> dict[str, str]:
    (cm,) = [o for o in find(objects, "ConfigMap") if o["metadata"]["name"].startswith("ctsr-config")]
    return cm["data"]


def container(objects: tuple[Obj, ...], deployment: str) -> Obj:
    (c,) = one(objects, "Deployment", deployment)["spec"]["template"]["spec"]["containers"]
    return c


def keda_errors(objects: list[Obj]) -> list[str]:
    node = shutil.which("node")
    assert node, "node is needed for KEDA's schemas (Debian: apt-get install nodejs; .ci/run does it)"
    assert (TOOLS / "node_modules" / "@kubernetes-models" / "keda").is_dir(), (
        f"run `npm ci --prefix {TOOLS.relative_to(REPO)}` (.ci/run does it)"
    )
    out = subprocess.run(
        [node, str(TOOLS / "validate-keda.js")], input=json.dumps(objects), capture_output=True, text=True, cwd=TOOLS
    )
    assert out.returncode in (0, 1), out.stderr
    return out.stdout.splitlines()


def is_keda(obj: Obj) -> bool:
    return obj["apiVersion"].startswith("keda.sh/")


# -- the checkers can fail ------------------------------------------------------------------------
def test_the_checkers_reject_broken_objects() -> None:
    objects = build("gpu")
    deployment = copy.deepcopy(one(objects, "Deployment", "ctsr-worker"))
    deployment["spec"]["replica"] = 2  # a typo: strict validation knows every field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    scaled = copy.deepcopy(one(objects, "ScaledObject", "ctsr-worker"))
    scaled["spec"]["maxReplicaCount"] = "eight"
    trigger_less = copy.deepcopy(one(objects, "ScaledObject", "ctsr-worker"))
    del trigger_less["spec"]["triggers"][0]["type"]
    errors = keda_errors([scaled, trigger_less])
    assert len(errors) == 2 and "maxReplicaCount" in errors[0] and "type" in errors[1], errors


# -- every object is valid -------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates(overlay: str) -> None:
    objects = build(overlay)
    for obj in objects:
        if not is_keda(obj):
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    keda = [o for o in objects if is_keda(o)]
    assert {o["kind"] for o in keda} == {"ScaledObject", "TriggerAuthentication"}
    assert keda_errors(keda) == []


def test_both_overlays_exist() -> None:
    assert OVERLAYS == ["cpu-demo", "gpu"]


# -- the manifests agree with the service ---------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_is_settings_the_service_knows(overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings ignores unknown CTSR_* names, so a typo here would silently do nothing."""
    data = config(build(overlay))
    fields = {f"CTSR_{name.upper()}" for name in Settings.model_fields}
    assert sorted(set(data) - fields) == []
    for key, value in data.items():
        monkeypatch.setenv(key, value)
    settings = Settings()  # every value parses
    assert settings.ready_needs_worker is False  # workers scale to zero: gateways must not wait for one


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ingress_limits_match_the_gateway(overlay: str) -> None:
    objects = build(overlay)
    settings = config(objects)
    notes = one(objects, "Ingress", "ctsr")["metadata"]["annotations"]
    size = re.fullmatch(r"(\d+)([kmg]?)", notes["nginx.ingress.kubernetes.io/proxy-body-size"])
    assert size, notes["nginx.ingress.kubernetes.io/proxy-body-size"]
    body_limit = int(size[1]) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[size[2]]
    assert body_limit == int(settings["CTSR_MAX_UPLOAD_BYTES"])
    assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) > int(settings["CTSR_MAX_WAIT_S"])
    gateway = one(objects, "Deployment", "ctsr-gateway")["spec"]["template"]["spec"]
    assert gateway["terminationGracePeriodSeconds"] > int(settings["CTSR_MAX_WAIT_S"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_ports_are_the_services_own(overlay: str) -> None:
    from service.app import create_app

    objects = build(overlay)
    settings = config(objects)
    routes = set(create_app(Settings(redis_url="redis://unused:1/0")).openapi()["paths"])  # routers included
    gateway = container(objects, "ctsr-gateway")
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz" and "/readyz" in routes
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/livez" and "/livez" in routes
    assert {p["name"]: p["containerPort"] for p in gateway["ports"]} == {"http": 8000}

    worker = container(objects, "ctsr-worker")
    ports = {p["name"]: p["containerPort"] for p in worker["ports"]}
    assert ports == {"metrics": int(settings["CTSR_WORKER_METRICS_PORT"])}
    assert settings["CTSR_WORKER_METRICS_HOST"] == "0.0.0.0"  # the probes come from the kubelet
    assert worker["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}  # = model loaded
    assert worker["livenessProbe"]["httpGet"]["path"] == "/livez"
    for name in ("ctsr-gateway", "ctsr-worker"):
        template = one(objects, "Deployment", name)["spec"]["template"]
        notes = template["metadata"]["annotations"]
        assert notes["prometheus.io/scrape"] == "true"
        assert int(notes["prometheus.io/port"]) in {p["containerPort"] for p in container(objects, name)["ports"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_scale_on_the_rq_queue(overlay: str) -> None:
    objects = build(overlay)
    settings = config(objects)
    scaled = one(objects, "ScaledObject", "ctsr-worker")["spec"]
    assert scaled["scaleTargetRef"]["name"] == "ctsr-worker" and find(objects, "Deployment", "ctsr-worker")
    assert 0 <= scaled["minReplicaCount"] < scaled["maxReplicaCount"]
    (redis_trigger,) = [t for t in scaled["triggers"] if t["type"] == "redis"]
    meta = redis_trigger["metadata"]
    assert meta["listName"] == f"rq:queue:{settings['CTSR_QUEUE']}"  # RQ's list of queued job ids
    namespace = one(objects, "ScaledObject", "ctsr-worker")["metadata"]["namespace"]
    assert meta["address"] == f"redis.{namespace}.svc.cluster.local:6379"  # KEDA resolves from its own namespace
    auth = one(objects, "TriggerAuthentication", redis_trigger["authenticationRef"]["name"])
    password = {"parameter": "password", "name": "ctsr-secrets", "key": "redis-password"}
    assert auth["spec"]["secretTargetRef"] == [password]
    worker = one(objects, "Deployment", "ctsr-worker")["spec"]["template"]["spec"]
    assert worker["terminationGracePeriodSeconds"] >= 120  # the batch in hand finishes on scale-down


def test_gpu_overlay_gives_each_worker_one_gpu_and_scales_on_queue_age() -> None:
    objects = build("gpu")
    resources = container(objects, "ctsr-worker")["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == 1 == resources["limits"]["nvidia.com/gpu"]
    assert config(objects)["CTSR_DEVICE"] == "cuda"
    scaled = one(objects, "ScaledObject", "ctsr-worker")["spec"]
    assert scaled["minReplicaCount"] == 0  # scale to zero
    (age,) = [t for t in scaled["triggers"] if t["type"] == "prometheus"]
    assert "ctsr_queue_oldest_job_age_seconds" in age["metadata"]["query"]
    import service.metrics

    assert '"ctsr_queue_oldest_job_age_seconds"' in inspect.getsource(service.metrics)  # the gateway exports it
    cpu = build("cpu-demo")
    assert "nvidia.com/gpu" not in json.dumps(container(cpu, "ctsr-worker")["resources"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_selector_finds_its_pods_and_every_container_is_bounded(overlay: str) -> None:
    objects = build(overlay)
    workloads = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]
    templates = {o["metadata"]["name"]: o["spec"]["template"] for o in workloads}

    def matches(selector: dict[str, str]) -> list[str]:
        return [n for n, t in templates.items() if selector.items() <= t["metadata"]["labels"].items()]

    for service in find(objects, "Service"):
        assert matches(service["spec"]["selector"]), f"Service {service['metadata']['name']} selects no pods"
    for budget in find(objects, "PodDisruptionBudget"):
        assert len(matches(budget["spec"]["selector"]["matchLabels"])) == 1
    for name, template in templates.items():
        for c in template["spec"]["containers"]:
            assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"], f"{name}/{c['name']}"
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True
    hpa = one(objects, "HorizontalPodAutoscaler", "ctsr-gateway")["spec"]
    assert hpa["minReplicas"] >= 2 and one(objects, "Deployment", "ctsr-gateway")["spec"]["replicas"] >= 2


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_gateways_workers_and_keda_reach_redis(overlay: str) -> None:
    objects = build(overlay)
    policy = one(objects, "NetworkPolicy", "redis")["spec"]
    redis_labels = one(objects, "StatefulSet", "redis")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= redis_labels.items()
    (rule,) = policy["ingress"]
    peers = rule["from"]
    (pods,) = [p for p in peers if "namespaceSelector" not in p]
    (allowed,) = pods["podSelector"]["matchExpressions"]
    assert allowed == {"key": "app.kubernetes.io/component", "operator": "In", "values": ["gateway", "worker"]}
    (keda,) = [p for p in peers if "namespaceSelector" in p]
    assert keda["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "keda"}
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_lives_in_the_repository(overlay: str) -> None:
    objects = build(overlay)
    assert find(objects, "Secret") == []  # made by the operator (README), referenced by name only
    refs = set(re.findall(r'"secretKeyRef": \{[^}]*"name": "([^"]+)"', json.dumps(objects)))
    assert refs == {"ctsr-secrets"}
    assert "PASSWORD" not in " ".join(config(objects))


def test_prometheus_follows_the_annotated_pods() -> None:
    """The shipped scrape job keeps exactly the annotation the manifests set and adds the
    ``namespace`` label that the autoscaler's queue-age query filters on."""
    (job,) = yaml.safe_load((K8S / "monitoring" / "prometheus-scrape.yaml").read_text())
    assert job["kubernetes_sd_configs"] == [{"role": "pod", "namespaces": {"names": ["ctsr"]}}]
    rules = {r.get("target_label", r.get("action")): r for r in job["relabel_configs"]}
    assert rules["keep"]["source_labels"] == ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"]
    assert rules["namespace"]["source_labels"] == ["__meta_kubernetes_namespace"]
    port = rules["__address__"]
    assert re.sub(port["regex"], port["replacement"].replace("$", "\\"), "10.1.2.3:8000;9100") == "10.1.2.3:9100"
    scaled = one(build("gpu"), "ScaledObject", "ctsr-worker")
    query = next(t for t in scaled["spec"]["triggers"] if t["type"] == "prometheus")
    assert f'namespace="{scaled["metadata"]["namespace"]}"' in query["metadata"]["query"]
