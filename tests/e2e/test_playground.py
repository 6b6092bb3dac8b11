"""`llamaserve playground` in a real browser: headless Chromium (Debian's package, driven by Playwright)
against the Gradio app, which talks to the session's real server. A question typed in gets the server's own
answer streamed in; the history goes with the next turn; the advanced options reach the request; the stop
button aborts the generation in the server. A screenshot is saved to build/test-artifacts/playground.png."""

import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import free_port
from tests.e2e.scrape import scrape

pytest.importorskip("gradio", reason="the playground extra is not installed: pip install '.[playground]'")
playwright = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (the dev extra)")

ARTIFACTS = Path(__file__).resolve().parents[2] / "build" / "test-artifacts"
CHROMIUM = next((path for path in ("/usr/lib/chromium/chromium", shutil.which("chromium") or "") if Path(path).is_file()),
                None)
SYSTEM = "You are a concise assistant."  # not the default, so the test shows it is sent
TOKENS = 24

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: apt-get install chromium (.ci/run does)")


@pytest.fixture(scope="module")
def playground(server, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("playground") / "playground.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "llamaserve.cli", "playground", "--url", server.url,
                                    "--port", str(port)], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, log.read_text()
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.3)
    yield url
    process.terminate()
    process.wait(timeout=20)


@pytest.fixture(scope="module")
def page(playground):
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.set_default_timeout(120_000)
        page.goto(playground, wait_until="load")
        page.locator("#message textarea").wait_for()  # the app has rendered
        yield page
        browser.close()


def ask(page, question: str) -> None:
    box = page.locator("#message textarea")
    box.fill(question)
    box.press("Enter")


def bot_messages(page) -> list[str]:
    return page.locator(".message-row.bot-row .message-content").all_inner_texts()


def wait_until_answered(page, turns: int) -> str:
    """The last answer, once the `turns`-th one has finished streaming (the stop button is gone)."""
    page.wait_for_function(f"document.querySelectorAll('.message-row.bot-row').length >= {turns}")
    page.locator(".stop-button").wait_for(state="hidden")
    return bot_messages(page)[-1].strip()


def api_answer(server, model: str, messages: list[dict], max_tokens: int) -> str:
    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120).json()["choices"][0]["message"][
        "content"].strip()


def test_the_served_model_is_named(page, model):
    assert model in page.locator("body").inner_text()


def test_a_question_gets_the_servers_answer_and_the_history_goes_with_the_next(page, server, model):
    page.get_by_text("Advanced options").click()
    page.get_by_label("System prompt").fill(SYSTEM)
    for name, value in (("Temperature", "0"), ("Max new tokens", str(TOKENS))):
        field = page.get_by_label(f"number input for {name}")
        field.fill(value)
        field.press("Enter")

    ask(page, "What is the capital of France?")
    first = wait_until_answered(page, 1)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is the capital of France?"}]
    assert first and first == api_answer(server, model, messages, TOKENS)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)

    ask(page, "And of Italy?")
    second = wait_until_answered(page, 2)
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "And of Italy?"}]
    assert second == api_answer(server, model, messages, TOKENS)


def test_the_answer_streams_in_and_the_stop_button_aborts_it(page, server):
    http = httpx.Client(base_url=server.url, timeout=60)
    field = page.get_by_label("number input for Max new tokens")
    field.fill("1500")
    field.press("Enter")
    aborted = scrape(http).get("llamaserve_request_success_total", finished_reason="abort")
    turns = len(bot_messages(page))
    ask(page, "Write a very long story about a dragon who learns to read, chapter by chapter.")
    page.wait_for_function(f"document.querySelectorAll('.message-row.bot-row').length > {turns}")
    # Text grows while the stop button is still up: the answer is streamed, not sent at the end.
    seen = set()
    deadline = time.monotonic() + 120
    while len(seen) < 3 and time.monotonic() < deadline:
        text = bot_messages(page)[-1]
        if text.strip() and page.locator(".stop-button").is_visible():
            seen.add(len(text))
        time.sleep(0.1)
    assert len(seen) >= 3, "the answer did not grow while it was generated"
    page.locator(".stop-button").click()
    page.locator(".stop-button").wait_for(state="hidden")
    deadline = time.monotonic() + 30
    while (scrape(http).get("llamaserve_request_success_total", finished_reason="abort") == aborted
           or http.get("/health").json()["num_running"] > 0):  # the engine's count follows its next message
        assert time.monotonic() < deadline, "the server did not abort the stopped request"
        time.sleep(0.2)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground-stopped.png"), full_page=True)
