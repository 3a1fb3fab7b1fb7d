"""Locust users for benchmarks/load_soak.py: upload a small photo, poll the job to its end.

Custom events, so the stats say what a client experienced per job, not per HTTP call:
``JOB completed`` (upload → finished, in ms), ``JOB rejected-429`` (with a Retry-After header)
and failures for anything else (5xx, 429 without Retry-After, a job that failed or never ended).
"""

from __future__ import annotations

import io
import time

from locust import HttpUser, constant, task
from PIL import Image

with Image.open("tests/data/seeding_96x72.jpg") as _im:
    _buf = io.BytesIO()
    _im.convert("RGB").resize((64, 48)).save(_buf, "JPEG", quality=90)
IMAGE = _buf.getvalue()


class Uploader(HttpUser):
    wait_time = constant(0.2)

    def _event(self, name: str, started: float, exception: Exception | None = None) -> None:
        self.environment.events.request.fire(
            request_type="JOB", name=name, response_time=(time.perf_counter() - started) * 1000,
            response_length=0, exception=exception, context={},
        )  # fmt: skip

    @task
    def upscale(self) -> None:
        started = time.perf_counter()
        files = {"image": ("in.jpg", IMAGE, "image/jpeg")}
        with self.client.post("/upscale", files=files, data={"alpha": "0.5"}, catch_response=True) as r:
            if r.status_code == 429:
                r.success()
                if "Retry-After" in r.headers:
                    self._event("rejected-429", started)
                else:
                    self._event("rejected-429", started, RuntimeError("429 without Retry-After"))
                return
            if r.status_code != 202:
                r.failure(f"upload answered {r.status_code}")
                return
            job = r.json()["id"]
        while time.perf_counter() - started < 300:
            status = self.client.get(f"/jobs/{job}", name="/jobs/[id]").json().get("status")
            if status == "finished":
                self._event("completed", started)
                return
            if status in ("failed", "canceled", "expired"):
                self._event("completed", started, RuntimeError(f"job {status}"))
                return
            time.sleep(0.25)
        self._event("completed", started, RuntimeError("job did not end in 300 s"))
