"""The playground's chat tab in a real headless Chromium, against a chat model: the page opens on it,
a message gets the reply /v1/chat/completions gives, and the conversation goes on. Needs Debian's chromium
and chromium-driver, like test_playground.py; skipped without them."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("selenium.webdriver")

from conftest import CHROMEDRIVER, CHROMIUM, sharpen  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from serving import running_server  # noqa: E402
from test_playground import set_slider  # noqa: E402

from scratchgpt.serving.server import create_app  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()),
    reason="needs Chromium and its driver: apt-get install -y chromium chromium-driver (as .ci/run does)",
)


@pytest.fixture(scope="module")
def chat_url():
    import torch

    from scratchgpt.build import build_model
    from scratchgpt.chat.template import chat_tokenizer
    from scratchgpt.config import ModelConfig
    from scratchgpt.tokenizer import CharTokenizer

    tokenizer = chat_tokenizer(CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz .,\n"))
    torch.manual_seed(0)
    model = sharpen(build_model(ModelConfig(vocab_size=tokenizer.vocab_size, block_size=128, n_layer=1, n_head=2, n_embd=16)))
    with torch.no_grad():  # a random model would often pick a role token first, and end its reply before it starts
        model.lm_head.weight[tokenizer.base_vocab_size:] = 0
    with running_server(create_app(model.eval(), tokenizer, "tiny-chat", max_tokens_cap=100)) as url:
        yield url


def test_the_chat_tab_shows_the_reply_the_api_gives(browser, chat_url):
    import httpx

    expected = httpx.post(chat_url + "/v1/chat/completions", timeout=30, json={
        "messages": [{"role": "user", "content": "hello there"}], "temperature": 0, "max_tokens": 12}).json()
    expected = expected["choices"][0]["message"]["content"]
    browser.get(chat_url + "/")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: "tiny-chat" in d.find_element(By.ID, "model").text)
    assert "active" in browser.find_element(By.ID, "tab-chat").get_attribute("class")  # a chat model opens on chat
    assert not browser.find_element(By.ID, "prompt").is_displayed()
    set_slider(browser, "temperature", 0)
    set_slider(browser, "max_tokens", 12)
    box = browser.find_element(By.ID, "chat-input")
    box.send_keys("hello there")
    box.send_keys(Keys.ENTER)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#chat-log .assistant")) == 1
               and d.find_element(By.ID, "send").text == "Send")
    turns = browser.find_elements(By.CSS_SELECTOR, "#chat-log .turn")
    assert [t.get_attribute("class") for t in turns] == ["turn user", "turn assistant"]
    assert turns[0].text == "hello there"
    assert turns[1].get_attribute("textContent") == expected != ""
    box.send_keys("and again")
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#chat-log .assistant")) == 2
               and d.find_element(By.ID, "send").text == "Send")
    assert browser.find_element(By.ID, "status").text == ""  # no error: the second turn went out with the history
    browser.find_element(By.ID, "tab-complete").click()
    assert browser.find_element(By.ID, "prompt").is_displayed()
