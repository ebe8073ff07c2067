"""The web playground in a real headless Chromium: type a prompt, click Generate, watch the text
stream in, hover a character for the model's alternatives. Needs Debian's chromium and
chromium-driver (.ci/run installs them); skipped without them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
webdriver = pytest.importorskip("selenium.webdriver")

from conftest import CHROMEDRIVER, CHROMIUM  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from serving import running_server, train_tiny_checkpoint  # noqa: E402

from scratchgpt import load  # noqa: E402
from scratchgpt.serving.server import create_app  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()),
    reason="needs Chromium and its driver: apt-get install -y chromium chromium-driver (as .ci/run does)",
)


@pytest.fixture(scope="module")
def server_url(tmp_path_factory, small_corpus):
    run = train_tiny_checkpoint(small_corpus, tmp_path_factory.mktemp("playground") / "tiny")
    model, tokenizer = load(run)
    with running_server(create_app(model, tokenizer, "tiny", max_tokens_cap=500)) as url:
        yield url


def set_slider(driver, element_id: str, value) -> None:
    driver.execute_script("const e = document.getElementById(arguments[0]); e.value = arguments[1];"
                          "e.dispatchEvent(new Event('input'));", element_id, str(value))


def test_type_generate_stream_and_hover(browser, server_url):
    browser.get(server_url + "/")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: "parameters" in d.find_element(By.ID, "model").text)  # /health answered
    # count the stream's chunks as they arrive, to see that the text came in pieces
    browser.execute_script("""
        window.chunkCount = 0;
        const original = window.addChunk;
        window.addChunk = function (choice) { window.chunkCount += 1; return original(choice); };
    """)
    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("the ")
    set_slider(browser, "max_tokens", 40)
    set_slider(browser, "temperature", 1)
    set_slider(browser, "top_k", 0)
    set_slider(browser, "top_p", 1)
    browser.find_element(By.ID, "seed").send_keys("3")
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("done"))

    spans = browser.find_elements(By.CSS_SELECTOR, "#output .tok")
    page_text = "".join(s.get_attribute("data-text") for s in spans)
    expected = httpx.post(f"{server_url}/v1/completions", timeout=60, json={
        "prompt": "the ", "max_tokens": 40, "temperature": 1, "top_p": 1, "seed": 3, "logprobs": 5}).json()["choices"][0]
    assert page_text == expected["text"] and len(spans) == 40
    assert browser.find_element(By.CSS_SELECTOR, "#output .prompt").get_attribute("textContent") == "the "
    assert browser.execute_script("return window.chunkCount") > 1  # streamed, not one answer at the end
    assert "40 tokens" in browser.find_element(By.ID, "status").text

    # every character is shaded by the model's confidence; hovering one shows its alternatives
    assert all(s.value_of_css_property("background-color") not in ("", "rgba(0, 0, 0, 0)") for s in spans)
    index = next(i for i, s in enumerate(spans) if s.get_attribute("data-text") not in ("\n", " "))
    ActionChains(browser).move_to_element(spans[index]).perform()
    tip = browser.find_element(By.ID, "tip")
    wait.until(lambda d: tip.is_displayed())
    probability = math.exp(expected["logprobs"]["token_logprobs"][index])
    assert f"with probability {100 * probability:.1f}%" in tip.text
    rows = tip.find_elements(By.CSS_SELECTOR, ".row")
    alternatives = expected["logprobs"]["top_logprobs"][index]
    assert len(rows) == len(alternatives) and len(rows) >= 5
    best = max(alternatives.values())
    assert rows[0].find_element(By.CSS_SELECTOR, ".pct").text == f"{100 * math.exp(best):.1f}%"  # most likely first
    ActionChains(browser).move_to_element(browser.find_element(By.ID, "prompt")).perform()
    wait.until(lambda d: not tip.is_displayed())


def test_a_bad_request_shows_the_servers_message(browser, server_url):
    browser.get(server_url + "/")
    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("\u03a9")  # not in the vocabulary
    browser.find_element(By.ID, "generate").click()
    status = browser.find_element(By.ID, "status")
    WebDriverWait(browser, 30).until(lambda d: "error" in (status.get_attribute("class") or ""))
    assert "does not know" in status.text and "\u03a9" in status.text
