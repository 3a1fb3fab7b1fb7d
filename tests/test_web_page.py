"""The web page at ``GET /``: served with its own CSP, and driven end to end in headless Chromium
(Playwright) against ``ctsr serve`` with the bundled model: upload the real photo, move the alpha
slider, watch the job, compare before/after, zoom, download, a sweep's gallery, and an API error.

The browser test needs the ``playwright`` package and the system's Chromium (``/usr/bin/chromium``,
Debian's ``chromium`` package; ``playwright install`` is not used); without them it is skipped.
Set ``CTSR_SCREENSHOTS_DIR`` to keep the desktop and phone screenshots (docs/screenshots/).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from conftest import PHOTO
from fastapi.testclient import TestClient
from PIL import Image
from service_helpers import Proc, answers_ok, free_port, pid_gone, redis_server_pids, service_env, wait_for

from ctsr.settings import Settings
from service.app import STATIC, create_app

CHROMIUM = Path("/usr/bin/chromium")
OUT = (96 * 4, 72 * 4)  # the photo is 96x72
SWEEP = ["0", "0.25", "0.5", "0.75", "1"]
PAGE_CSP_PARTS = ("default-src 'self'", "script-src 'self'", "style-src 'self'", "connect-src 'self'")


# -- without a browser --------------------------------------------------------------------------------
def test_page_and_static_files_are_served_with_the_page_csp() -> None:
    client = TestClient(create_app(Settings(redis_url="redis://127.0.0.1:1/0")))  # nothing here needs Redis
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    csp = page.headers["content-security-policy"]
    assert all(part in csp for part in PAGE_CSP_PARTS), csp
    assert "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    html = page.text
    assert '<script src="/static/app.js"' in html and 'href="/static/app.css"' in html
    assert "<style" not in html and " style=" not in html, "no inline styles"
    assert not re.search(r"<[^>]*\son[a-z]+=", html), "no inline event handlers"
    assert not re.search(r"<script(?![^>]*\bsrc=)", html), "no inline scripts"
    assert not re.search(r"(src|href)=\"(https?:)?//", html), "nothing from another origin"
    for name, kind in (("app.js", "text/javascript"), ("app.css", "text/css")):
        response = client.get(f"/static/{name}")
        assert response.status_code == 200
        assert response.headers["content-type"].split(";")[0] == kind
        assert all(part in response.headers["content-security-policy"] for part in PAGE_CSP_PARTS)
        assert response.content == (STATIC / name).read_bytes()
        assert not re.search(r"https?://", response.text), f"{name} loads nothing from another origin"
    missing = client.get("/static/nope.js")
    assert missing.status_code == 404 and missing.json()["error"]["code"]
    # the API keeps its own strict policy, and the page is not part of the API schema
    assert client.get("/livez").headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"
    paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths and not any(p.startswith("/static") for p in paths)


# -- in a browser ----------------------------------------------------------------------------------------
@pytest.fixture
def served(tmp_path: Path) -> Iterator[str]:
    """``ctsr serve`` (bundled model, embedded Redis) on a free port; its base URL."""
    env = service_env(tile=64, max_batch=8, warmup=0, worker_metrics_port=0, max_alphas=8, state_dir=tmp_path / "state")
    redis_before = redis_server_pids()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = Proc(["serve", "--port", str(port)], env, tmp_path / "serve.log")

    def ready() -> bool:
        assert proc.alive(), f"ctsr serve exited:\n{proc.output[-3000:]}"
        try:
            return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    children: list[int] = []
    try:
        wait_for(ready, timeout=60, interval=0.2, what="ctsr serve to be ready")
        children = [c.pid for c in proc.descendants()]
        yield base
    finally:
        proc.signal(signal.SIGINT)
        with contextlib.suppress(AssertionError):
            proc.wait(timeout=20)
        proc.stop()
        # the embedded redis-server daemonizes out of the process group: stop it by pid
        for pid in [*children, *sorted(redis_server_pids() - redis_before)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()
            wait_for(lambda pid=pid: pid_gone(pid), timeout=5, what=f"pid {pid} to stop")
        socket = re.search(r"embedded redis-server on (\S+)", proc.output)
        if socket:
            shutil.rmtree(Path(socket.group(1)).parent, ignore_errors=True)


def natural_size(page, selector: str) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    return tuple(page.eval_on_selector(selector, "img => [img.naturalWidth, img.naturalHeight]"))


def wait_result(page, count: int = 1) -> None:  # type: ignore[no-untyped-def]
    """Until the page shows ``count`` results and the main output image has loaded."""
    page.wait_for_function(
        """count => {
            const after = document.getElementById("after");
            const shown = !document.getElementById("result").hidden && after.complete && after.naturalWidth > 0;
            const gallery = document.querySelectorAll("#gallery img");
            return shown && (count === 1 || (gallery.length === count && [...gallery].every(i => i.naturalWidth)));
        }""",
        arg=count,
        timeout=45_000,
    )


@pytest.fixture
def sync_api() -> Any:
    """Playwright's sync API, or a skip when it or the system's Chromium is missing (before any server starts)."""
    api = pytest.importorskip("playwright.sync_api", reason="the web page test needs `pip install playwright`")
    if not CHROMIUM.exists():
        pytest.skip(f"the web page test needs Chromium at {CHROMIUM} (apt-get install chromium)")
    return api


@pytest.mark.slow
def test_web_page_end_to_end(sync_api: Any, served: str, tmp_path: Path) -> None:
    keep = Path(os.environ["CTSR_SCREENSHOTS_DIR"]) if os.environ.get("CTSR_SCREENSHOTS_DIR") else None
    shots = keep or tmp_path
    shots.mkdir(parents=True, exist_ok=True)

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
            page = context.new_page()
            problems: list[str] = []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            failed: list[str] = []
            page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            other_origin: list[str] = []
            own = (served, "blob:", "data:")
            page.on("request", lambda r: None if r.url.startswith(own) else other_origin.append(r.url))
            page.goto(f"{served}/")
            assert page.title().startswith("CTSR")

            # one alpha: choose the photo, move the slider to 0.75 with the keyboard, submit
            page.set_input_files("#file", str(PHOTO))
            page.wait_for_function("document.getElementById('preview').naturalWidth > 0")
            page.focus("#alpha")
            for _ in range(5):
                page.keyboard.press("ArrowRight")
            assert page.input_value("#alpha") == "0.75"
            assert page.text_content("#alpha-value") == "0.75"
            page.click("#submit")
            wait_result(page)
            assert natural_size(page, "#after") == OUT
            assert natural_size(page, "#before") == (96, 72)  # the input, scaled up by CSS
            assert page.text_content("#result-label") == "α = 0.75"
            assert "96×72 → 384×288" in page.text_content("#status")
            assert page.is_hidden("#error") and page.is_hidden("#gallery")
            # the before/after divider and the zoom
            page.fill("#split", "25")
            assert page.eval_on_selector("#compare", "el => el.style.getPropertyValue('--split')") == "25%"
            page.select_option("#zoom", "2")
            assert page.eval_on_selector("#compare", "el => el.getBoundingClientRect().width") == OUT[0] * 2
            page.select_option("#zoom", "fit")
            # the download link hands over the very image the API returned
            with page.expect_download() as download:
                page.click("#download")
            assert download.value.suggested_filename == "seeding_96x72_x4_alpha0.75.png"
            with Image.open(download.value.path()) as img:
                assert (img.format, img.size) == ("PNG", OUT)
            page.fill("#split", "50")
            page.evaluate("window.scrollTo(0, 0)")
            page.screenshot(path=str(shots / "web_page_desktop.png"))

            # a sweep: one result per alpha in the gallery, flipped through with ◀ ▶
            page.check("#mode-sweep")
            assert page.input_value("#alphas") == ", ".join(SWEEP)
            page.click("#submit")
            wait_result(page, len(SWEEP))
            sizes = page.eval_on_selector_all("#gallery img", "els => els.map(i => [i.naturalWidth, i.naturalHeight])")
            assert [tuple(s) for s in sizes] == [OUT] * len(SWEEP)
            captions = page.eval_on_selector_all("#gallery figcaption", "els => els.map(e => e.textContent)")
            assert captions == [f"α = {a}" for a in SWEEP]
            assert page.text_content("#result-label") == "α = 0 (1 of 5)"
            page.click("#next")
            assert page.text_content("#result-label") == "α = 0.25 (2 of 5)"
            page.click("#gallery figure:nth-child(5)")
            assert page.text_content("#result-label") == "α = 1 (5 of 5)"
            assert page.get_attribute("#download", "download") == "seeding_96x72_x4_alpha1.png"
            page.screenshot(path=str(shots / "web_page_sweep.png"), full_page=True)

            # an API refusal is shown as a plain message: a text file is not an image
            not_image = {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"these are not pixels\n" * 10}
            refusal = httpx.post(f"{served}/upscale", files={"image": ("notes.txt", not_image["buffer"], "text/plain")})
            assert refusal.status_code == 415, refusal.text
            message = refusal.json()["error"]["message"]
            page.set_input_files("#file", files=[not_image])
            page.click("#submit")
            page.wait_for_selector("#error", state="visible")
            assert message in page.text_content("#error")
            assert page.is_enabled("#submit")

            # a phone-sized viewport: the same flow fits without sideways scrolling
            phone = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
            mobile = phone.new_page()
            mobile.goto(f"{served}/")
            mobile.set_input_files("#file", str(PHOTO))
            mobile.click("#submit")
            wait_result(mobile)
            assert natural_size(mobile, "#after") == OUT
            assert mobile.evaluate("document.documentElement.scrollWidth") <= 390
            assert mobile.eval_on_selector("#compare", "el => el.getBoundingClientRect().width") <= 390
            mobile.evaluate("document.getElementById('drop').scrollIntoView()")
            mobile.screenshot(path=str(shots / "web_page_phone.png"))
            phone.close()

            for name in ("web_page_desktop.png", "web_page_sweep.png", "web_page_phone.png"):
                assert (shots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            with Image.open(io.BytesIO((shots / "web_page_phone.png").read_bytes())) as img:
                assert img.width == 390
            assert not other_origin, f"the page loaded from another origin: {other_origin}"
            # the API's refusal above is the one failed request (Chromium logs it); nothing else failed
            assert failed == [f"415 {served}/upscale"], failed
            assert [p for p in problems if "status of 415" not in p] == [], problems
        finally:
            browser.close()


@pytest.mark.slow
def test_docs_render_offline(sync_api: Any, redis: Any, tmp_path: Path) -> None:
    """/docs and /redoc in a browser that may reach nothing but the gateway: every operation shows,
    and no script, style or font is asked of another host."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = Proc(["gateway", "--port", str(port)], service_env(redis_url=f"unix://{redis.socket_file}"),
                tmp_path / "gateway.log")  # fmt: skip
    elsewhere: list[str] = []
    try:
        wait_for(lambda: answers_ok(f"{base}/livez"), 30, interval=0.1, what="the gateway")
        operations = len([op for ops in httpx.get(f"{base}/openapi.json").json()["paths"].values() for op in ops])
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
            page = browser.new_page()

            def local_only(route: Any) -> None:
                if route.request.url.startswith(base):
                    route.continue_()
                else:  # blocked; only ReDoc's "powered by" logo image may ask (it renders without)
                    if route.request.resource_type != "image":
                        elsewhere.append(route.request.url)
                    route.abort()

            page.route("**/*", local_only)
            page.goto(f"{base}/docs")
            page.wait_for_selector(".opblock", timeout=30_000)
            assert page.locator(".opblock").count() == operations
            page.goto(f"{base}/redoc")
            page.wait_for_selector("[data-section-id^='operation/']", timeout=30_000)
            ids = "[...document.querySelectorAll(\"[data-section-id^='operation/']\")].map(e => e.dataset.sectionId)"
            assert page.evaluate(f"new Set({ids}).size") == operations
            browser.close()
        assert elsewhere == [], f"the docs tried to load {elsewhere}"
    finally:
        proc.stop()
