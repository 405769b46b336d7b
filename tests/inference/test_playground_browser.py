"""The playground in a real headless Chromium (Playwright) against the live API + inference server: log in,
pick a fine-tuned model, type a conversation, and see the base model's and the fine-tuned model's replies
streamed side by side, each equal to what ``/v1/chat/completions`` answers for the same conversation."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.inference.conftest import LiveApi, Project

CHROMIUM = Path("/usr/bin/chromium")
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
if not CHROMIUM.exists():
    pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium)", allow_module_level=True)

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
SETTINGS = {"temperature": 0.9, "max_tokens": 16, "seed": 11}


@pytest.fixture(scope="module")
def page() -> Iterator[Any]:
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            yield browser.new_page(viewport={"width": 1280, "height": 800})
        finally:
            browser.close()


def _api_reply(project: Project, api: LiveApi, model: str, messages: list[dict[str, str]]) -> str:
    done = project.client(api).chat.completions.create(
        model=model,
        messages=messages,  # type: ignore[arg-type]
        temperature=SETTINGS["temperature"],
        max_tokens=int(SETTINGS["max_tokens"]),
        seed=int(SETTINGS["seed"]),
    )
    return done.choices[0].message.content or ""


def _send(page: Any, message: str, turn: int) -> tuple[str, str]:
    """Type ``message``, send it, wait until both sides' ``turn``-th reply has streamed to its end."""
    page.fill("#message", message)
    page.click("#send")
    texts = []
    for side in ("base", "tuned"):
        reply = page.locator(f"#turns-{side} li.assistant").nth(turn - 1)
        sync_api.expect(reply).to_have_attribute("data-state", "done", timeout=120_000)
        texts.append(reply.text_content() or "")
    return texts[0], texts[1]


def test_playground_streams_base_and_fine_tuned_side_by_side(page: Any, project: Project, live_api: LiveApi) -> None:
    page.goto(f"{live_api.url}/playground")
    assert page.url == f"{live_api.url}/login"  # no session: log in first
    page.fill("#api_key", project.key)
    page.click("button[type=submit]")
    page.wait_for_url(f"{live_api.url}/")
    page.click("text=Playground")
    page.wait_for_url(f"{live_api.url}/playground")

    options = page.eval_on_selector_all("#tuned-model option", "els => els.map(e => e.value)")
    assert {project.fine_tuned_model, project.checkpoint, project.running_checkpoint} <= set(options)
    page.select_option("#tuned-model", project.fine_tuned_model)
    page.fill("#temperature", str(SETTINGS["temperature"]))
    page.fill("#max-tokens", str(SETTINGS["max_tokens"]))
    page.fill("#seed", str(SETTINGS["seed"]))

    first = "What is the capital of Brazil?"
    base, tuned = _send(page, first, 1)
    convo = [{"role": "user", "content": first}]
    assert base == _api_reply(project, live_api, "tiny-mistral", convo)
    assert tuned == _api_reply(project, live_api, project.fine_tuned_model, convo)
    assert base != tuned  # the adapter changed the reply

    second = "And of Australia?"  # the conversation goes on: each side with its own earlier reply
    base2, tuned2 = _send(page, second, 2)
    assert base2 == _api_reply(
        project,
        live_api,
        "tiny-mistral",
        [*convo, {"role": "assistant", "content": base}, {"role": "user", "content": second}],
    )
    assert tuned2 == _api_reply(
        project,
        live_api,
        project.fine_tuned_model,
        [*convo, {"role": "assistant", "content": tuned}, {"role": "user", "content": second}],
    )
    assert page.inner_text(".side[data-side=tuned] .side-model") == project.fine_tuned_model

    out = Path(os.environ.get("IPO_TEST_ARTIFACTS", REPO / "test-artifacts")) / "dashboard"
    out.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out / "playground.png"), full_page=True)

    # A model the project cannot use: the side shows the API's 404 message, the other side still answers.
    page.evaluate(
        "() => { const o = document.createElement('option'); o.value = 'ft:tiny-mistral:ipo:ftjob-nope';"
        " document.getElementById('tuned-model').appendChild(o); }"
    )
    page.select_option("#tuned-model", "ft:tiny-mistral:ipo:ftjob-nope")
    page.click("#reset")
    page.fill("#message", first)
    page.click("#send")
    tuned_reply, base_reply = page.locator("#turns-tuned li.assistant"), page.locator("#turns-base li.assistant")
    sync_api.expect(tuned_reply).to_have_attribute("data-state", "error", timeout=60_000)
    assert "does not exist" in (tuned_reply.text_content() or "")
    sync_api.expect(base_reply).to_have_attribute("data-state", "done", timeout=60_000)
