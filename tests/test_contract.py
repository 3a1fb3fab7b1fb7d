"""The queue contract (``ctsr/contract.py``): one home for the values gateway and worker share,
payloads that survive a rolling deploy, and no torch on the way in."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys

from conftest import REPO

import ctsr.contract as contract
import models.defaults
from ctsr.contract import PAYLOAD_VERSION, JobPayload, new_job_id


def test_payload_carries_its_version() -> None:
    payload = JobPayload(new_job_id(), [0.5])
    assert payload.version == PAYLOAD_VERSION
    assert payload.to_dict()["version"] == PAYLOAD_VERSION
    assert JobPayload.from_dict(payload.to_dict()) == payload


def test_a_newer_writers_payload_reads() -> None:
    """A newer gateway adds a field and bumps nothing an older worker needs: the worker reads on."""
    sent = JobPayload(new_job_id(), [0.0, 1.0], "webp", 70, "adain", 40, 30, deadline=5.0, owner="alice")
    newer = {**sent.to_dict(), "priority": "high", "tenant": {"id": 7}, "version": PAYLOAD_VERSION + 1}
    read = JobPayload.from_dict(json.loads(json.dumps(newer)))  # through JSON, as RQ stores it
    assert (read.job_id, read.alphas, read.format, read.quality, read.color_fix) == (
        sent.job_id, [0.0, 1.0], "webp", 70, "adain",
    )  # fmt: skip
    assert (read.width, read.height, read.deadline, read.owner) == (40, 30, 5.0, "alice")
    assert read.version == PAYLOAD_VERSION + 1  # the reader can tell it came from a newer writer
    assert not hasattr(read, "priority")


def test_an_older_writers_payload_reads() -> None:
    """An older gateway never sent the newer fields: they take their defaults."""
    older = {"job_id": new_job_id(), "alphas": [0.5]}
    read = JobPayload.from_dict(older)
    assert (read.format, read.quality, read.color_fix) == (
        contract.DEFAULT_FORMAT, contract.DEFAULT_QUALITY, contract.DEFAULT_COLOR_FIX,
    )  # fmt: skip
    assert read.webhook is None and read.owner is None and read.deadline == 0.0
    assert read.version == PAYLOAD_VERSION


def test_shared_values_have_one_home() -> None:
    # the model's own values are the model's objects, re-exported (not copies that could drift)
    assert contract.COLOR_FIXES is models.defaults.COLOR_FIXES
    assert contract.DEFAULT_ALPHA == models.defaults.DEFAULT_ALPHA
    assert contract.DEFAULT_COLOR_FIX == models.defaults.DEFAULT_COLOR_FIX in contract.COLOR_FIXES
    assert contract.DEFAULT_FORMAT in contract.OUTPUT_FORMATS
    assert set(contract.FORMAT_MAX_SIDE) == set(contract.OUTPUT_FORMATS)
    low, high = contract.QUALITY_RANGE
    assert low <= contract.DEFAULT_QUALITY <= high
    assert importlib.metadata.version("ctsr") == contract.VERSION


def test_the_gateway_schema_reads_the_contract() -> None:
    """``/openapi.json`` lists the contract's formats, colour fixes, defaults and version."""
    from redis import Redis

    from service.app import create_app

    schema = create_app(redis=Redis()).openapi()  # no connection is made to build the schema
    assert schema["info"]["version"] == contract.VERSION
    form = schema["paths"]["/upscale"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    fields = form["properties"]
    assert fields["format"]["enum"] == list(contract.OUTPUT_FORMATS)
    assert fields["format"]["default"] == contract.DEFAULT_FORMAT
    assert fields["color_fix"]["enum"] == list(contract.COLOR_FIXES)
    assert fields["color_fix"]["default"] == contract.DEFAULT_COLOR_FIX
    assert (fields["quality"]["minimum"], fields["quality"]["maximum"]) == contract.QUALITY_RANGE
    assert fields["quality"]["default"] == contract.DEFAULT_QUALITY
    status = schema["components"]["schemas"]["JobStatusBody"]["properties"]["format"]
    assert status["enum"] == list(contract.OUTPUT_FORMATS)


def test_the_contract_and_the_gateway_import_no_torch() -> None:
    code = "import sys, ctsr.contract, service.app, service.routes.jobs, service.jobs; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False", "ctsr.contract or the gateway imported torch"
