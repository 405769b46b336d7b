"""The dashboard in a real headless Chromium (Playwright) against a live stack (``ipo serve`` + a Celery
worker training the tiny model): log in, watch a running job's loss chart grow over SSE, cancel a job
with its button, download the trained adapter, and see another project's job as a 404 page.

Screenshots go to ``$IPO_TEST_ARTIFACTS/dashboard`` (default ``test-artifacts/dashboard``, git-ignored);
``IPO_UPDATE_DOCS_SCREENSHOT=1`` also refreshes ``docs/dashboard.png`` for the README.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from app.auth import create_key
from app.db import make_engine, make_sessionmaker
from tests.e2e.conftest import Stack
from worker.training.demo_data import write_demo_data

CHROMIUM = Path("/usr/bin/chromium")
if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
if not CHROMIUM.exists():
    pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium)", allow_module_level=True)

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
WAIT_S = 600
MAX_STEPS = 60
N_POINTS = 20
XSS = 'What is 1 plus 3? <img src=x onerror="window.__xss=1">'
XSS_REPLIES = {
    "chosen": [{"role": "assistant", "content": "The sum is 4. <script>window.__xss=2</script>"}],
    "rejected": [{"role": "assistant", "content": "The product is 3."}],
}
"""60 steps log every 3rd step (worker/training/recipe.py): 20 training points on the loss chart."""


@pytest.fixture(scope="module")
def artifacts() -> Path:
    out = Path(os.environ.get("IPO_TEST_ARTIFACTS", REPO / "test-artifacts")) / "dashboard"
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


JUDGE = {
    "type": "score_model",
    "name": "quality",
    "model": "tiny-mistral",
    "input": [{"role": "user", "content": "Rate 0-1: {{sample.output_text}}"}],
}
SAMPLES = {
    "max_new_tokens": 8,
    # a rouge_l grader charts a score per sample step; the score_model one has no endpoint on this worker
    # (IPO_GRADER_BASE_URL unset): a warning and null scores, which must not break the chart
    "graders": [{"type": "text_similarity", "name": "overlap", "evaluation_metric": "rouge_l"}, JUDGE],
}


def _create_jobs(stack: Stack, tmp_path: Path) -> tuple[str, str]:
    """A short IPO job with validation (trains first) and a second one queued behind it."""
    train, valid = write_demo_data(tmp_path / "data", n_train=48, n_valid=8, seed=2)
    with valid.open("a", encoding="utf-8") as f:  # model text is untrusted: the samples table must show it as text
        f.write(json.dumps({"prompt": [{"role": "user", "content": XSS}], **XSS_REPLIES}) + "\n")
    http = httpx.Client(base_url=stack.url, headers=stack.headers, timeout=30)
    files = []
    for path in (train, valid):
        with path.open("rb") as fh:
            r = http.post("/v1/files", files={"file": (path.name, fh)}, data={"purpose": "fine-tune"})
        assert r.status_code == 200, r.text
        files.append(r.json()["id"])
    hyper = {"max_steps": MAX_STEPS, "batch_size": 4, "beta": 0.1, "checkpoint_every": 30}
    ids = []
    for suffix in ("dash", "dash-cancel"):
        body = {
            "model": "tiny-mistral",
            "training_file": files[0],
            "validation_file": files[1],
            "suffix": suffix,
            "seed": 5,
            "method": {"type": "ipo", "ipo": {"hyperparameters": hyper, "samples": SAMPLES}},
        }
        r = http.post("/v1/fine_tuning/jobs", json=body)
        assert r.status_code == 200, r.text
        ids.append(r.json()["id"])
    return ids[0], ids[1]


def _other_project_key(stack: Stack) -> str:
    engine = make_engine(stack.env["IPO_DATABASE_URL"])
    with make_sessionmaker(engine)() as session, session.begin():
        _, key = create_key(session, "dashboard-other")
    engine.dispose()
    return key


def _login(page: Page, stack: Stack, key: str) -> int:
    page.goto(f"{stack.url}/login")
    page.fill("#api_key", key)
    with page.expect_response(lambda r: r.url.endswith("/login") and r.request.method == "POST") as answer:
        page.click("button[type=submit]")
    return answer.value.status


def _points(page: Page) -> int:
    return int(page.get_attribute("#chart-loss", "data-points") or 0)


def _watch_chart_grow(page: Page, timeout: float) -> tuple[int, int]:
    """Sample the loss chart's point count while the page shows the job running, until it has grown.
    The page reloads itself on status changes, so a sample may hit a navigation: skip it."""
    deadline = time.monotonic() + timeout
    seen: list[int] = []
    status = None
    while time.monotonic() < deadline:
        try:
            status = page.get_attribute("#job-status", "data-status", timeout=5_000)
            points = _points(page)
        except sync_api.Error:
            continue
        if status == "running" and points >= 1:
            seen.append(points)
            if seen[-1] > seen[0]:
                return seen[0], seen[-1]
        elif status in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.2)
    raise AssertionError(f"the loss chart did not grow while the job ran: samples {seen}, status {status}")


def test_dashboard_in_a_browser(stack: Stack, browser: Browser, artifacts: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 1060})
    page = context.new_page()
    page.set_default_timeout(30_000)
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(str(exc)))

    # Not logged in: the job list sends the browser to the login page; a wrong key is a 401 page.
    page.goto(f"{stack.url}/")
    assert page.url == f"{stack.url}/login"
    assert _login(page, stack, "ipo-sk-" + "0" * 43) == 401
    assert "Incorrect or revoked API key" in page.inner_text("#login-error")
    assert _login(page, stack, stack.api_key) == 303
    page.wait_for_url(f"{stack.url}/")

    # Open the job page before the job starts, and watch its loss chart grow over SSE while it runs.
    trained, to_cancel = _create_jobs(stack, tmp_path)
    page.goto(f"{stack.url}/")
    page.click(f"a[href='/jobs/{trained}']")
    try:
        first, later = _watch_chart_grow(page, WAIT_S)
    except AssertionError as exc:
        job = httpx.get(f"{stack.url}/v1/fine_tuning/jobs/{trained}", headers=stack.headers).json()
        raise AssertionError(f"{exc}; job error {job.get('error')}; logs in {stack.logs}") from exc
    assert later > first >= 1
    page.screenshot(path=str(artifacts / "job-running.png"), full_page=True)

    # Cancel the second job (queued behind the first) with its button.
    page.goto(f"{stack.url}/jobs/{to_cancel}")
    page.click("#cancel")
    page.wait_for_selector("#job-status[data-status='cancelled']")
    assert page.locator("#cancel").count() == 0

    # The trained job finishes: its page shows every point and offers the adapter for download.
    page.goto(f"{stack.url}/jobs/{trained}")
    page.wait_for_selector("#job-status[data-status='succeeded']", timeout=WAIT_S * 1000)
    page.wait_for_function(f"() => Number(document.querySelector('#chart-loss').dataset.points) >= {N_POINTS}")
    assert int(page.get_attribute("#chart-margin", "data-points") or 0) >= N_POINTS
    assert page.locator("#events tbody tr").count() > N_POINTS
    with page.expect_download() as download:
        page.click("a.download[data-kind='adapter']")
    with zipfile.ZipFile(io.BytesIO(Path(download.value.path()).read_bytes())) as zf:
        assert "adapter_model.safetensors" in zf.namelist(), zf.namelist()
    assert page.locator("#checkpoints tbody tr").count() >= 1
    # Samples side by side (validation prompts, every 15 steps and at the end), the step chosen in the list.
    page.wait_for_function("() => Number(document.querySelector('#samples').dataset.steps) >= 4")
    assert page.get_attribute("#samples", "data-shown-step") == str(MAX_STEPS)
    assert page.locator("#samples-table tbody tr").count() == 9  # 8 validation pairs + the XSS one
    page.select_option("#samples-step", "15")
    assert page.get_attribute("#samples", "data-shown-step") == "15"
    assert XSS in page.inner_text("#samples-table") and "<script>window.__xss=2</script>" in page.inner_text(
        "#samples-table"
    )
    assert page.locator("#samples-table img, #samples-table script").count() == 0
    assert page.evaluate("() => window.__xss === undefined")
    assert int(page.get_attribute("#chart-sample-logps", "data-points") or 0) >= 4
    assert page.is_visible("#figure-graders") and int(page.get_attribute("#chart-graders", "data-points") or 0) >= 4
    page.mouse.move(0, 0)  # no hover underline in the pictures
    page.screenshot(path=str(artifacts / "job-succeeded.png"), full_page=True)
    page.screenshot(path=str(artifacts / "dashboard.png"))  # the first screen: facts, results and charts
    if os.environ.get("IPO_UPDATE_DOCS_SCREENSHOT") == "1":
        shutil.copyfile(artifacts / "dashboard.png", REPO / "docs" / "dashboard.png")

    page.goto(f"{stack.url}/")
    assert page.locator(f"tr[data-job-id='{to_cancel}']").get_attribute("data-status") == "cancelled"
    page.screenshot(path=str(artifacts / "job-list.png"), full_page=True)
    page.goto(f"{stack.url}/?status=cancelled")
    assert page.locator(f"tr[data-job-id='{to_cancel}']").count() == 1
    assert page.locator(f"tr[data-job-id='{trained}']").count() == 0

    # Log out, log in as another project: the job is a 404 page there.
    page.click("text=Log out")
    page.wait_for_url(f"{stack.url}/login")
    assert _login(page, stack, _other_project_key(stack)) == 303
    response = page.goto(f"{stack.url}/jobs/{trained}")
    assert response is not None and response.status == 404
    assert page.get_attribute("#error-page", "data-status") == "404"

    assert not problems, problems
    context.close()
    print(f"dashboard browser test took {time.monotonic() - started:.1f}s")
