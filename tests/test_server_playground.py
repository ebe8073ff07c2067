"""The playground against a server that needs an API key, in a real headless Chromium: without the key
the page says so, with it the text streams in, and the header shows the server's load from /health.
Needs Debian's chromium and chromium-driver, like test_playground.py; skipped without them."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("selenium.webdriver")

from conftest import CHROMEDRIVER, CHROMIUM  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from serving import running_server  # noqa: E402
from test_playground import set_slider  # noqa: E402

from scratchgpt.serving.server import create_app  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()),
    reason="needs Chromium and its driver: apt-get install -y chromium chromium-driver (as .ci/run does)",
)
KEY = "playground-key"


@pytest.fixture(scope="module")
def keyed_url():
    import torch

    from scratchgpt.build import build_model
    from scratchgpt.config import ModelConfig
    from scratchgpt.tokenizer import CharTokenizer

    tokenizer = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz .,\n")
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    with running_server(create_app(model.eval(), tokenizer, "tiny", max_tokens_cap=500, api_key=KEY)) as url:
        yield url


def generate(browser, max_tokens: int) -> None:
    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("the ")
    set_slider(browser, "max_tokens", max_tokens)
    browser.find_element(By.ID, "generate").click()


def test_the_key_field_sends_the_key_and_the_header_shows_the_load(browser, keyed_url):
    browser.get(keyed_url + "/")
    browser.execute_script("sessionStorage.clear()")
    browser.get(keyed_url + "/")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: "parameters" in d.find_element(By.ID, "model").text)  # /health needs no key
    load = browser.find_element(By.ID, "load")
    wait.until(lambda d: load.text.startswith("running 0 \u00b7 waiting 0 \u00b7 "))
    assert load.text.endswith("tokens/s")

    status = browser.find_element(By.ID, "status")
    generate(browser, 20)  # no key: refused, and the page says where the key goes
    wait.until(lambda d: "error" in (status.get_attribute("class") or ""))
    assert "API key" in status.text and "fill in the API key field" in status.text

    browser.find_element(By.ID, "api_key").send_keys("wrong")
    generate(browser, 20)
    wait.until(lambda d: "check the API key field" in status.text)

    browser.find_element(By.ID, "api_key").clear()
    browser.find_element(By.ID, "api_key").send_keys(KEY)
    generate(browser, 300)
    wait.until(lambda d: status.text.startswith("done"))
    assert len(browser.find_elements(By.CSS_SELECTOR, "#output .tok")) == 300
    # a refresh after the end (every 2 s) shows nothing running, and those tokens' rate
    wait.until(lambda d: load.text.startswith("running 0 \u00b7 waiting 0 \u00b7 ") and not load.text.endswith(" 0 tokens/s"))

    browser.get(keyed_url + "/")  # the key stays for this tab
    assert browser.find_element(By.ID, "api_key").get_attribute("value") == KEY
