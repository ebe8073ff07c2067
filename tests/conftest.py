"""Shared fixtures: the Tiny Shakespeare file from ../shared, a small synthetic corpus, tiny configs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from scratchgpt.config import Config, DataConfig, ModelConfig, TrainConfig

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = Path(os.environ.get("SCRATCHGPT_TEST_DATA", REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"))


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Token caches and downloads go to a temporary folder, never the user's ~/.cache."""
    os.environ["SCRATCHGPT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"Tiny Shakespeare not found at {SHAKESPEARE} (set SCRATCHGPT_TEST_DATA)")
    return SHAKESPEARE


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A few kilobytes of repetitive, learnable text with a small vocabulary."""
    lines = [f"the {animal} sat on the {thing}.\n" for animal in ("cat", "dog", "bird", "fox") for thing in ("mat", "log", "hat")]
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    path.write_text("".join(lines) * 40, encoding="utf-8")
    return path


# A one-layer, 16-wide model on the CPU, for tests that run the `scratchgpt` command itself.
TINY_MODEL_FLAGS = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
                    "--device", "cpu"]
# ... and for `scratchgpt train`: a one-batch estimate, no samples, float32, no progress bar.
TINY_TRAIN_FLAGS = [*TINY_MODEL_FLAGS, "--eval-iters", "1", "--sample-tokens", "0", "--dtype", "float32", "--no-progress"]


def tiny_config(data_path: Path | str, **train_overrides) -> Config:
    """A 2-layer, 32-wide GPT that trains in a second or two."""
    train = dict(batch_size=8, max_steps=20, learning_rate=3e-3, min_lr=3e-4, warmup_steps=5, eval_interval=10,
                 eval_iters=2, sample_tokens=0, seed=7, device="cpu", dtype="float32")
    train.update(train_overrides)
    return Config(
        model=ModelConfig(block_size=16, n_layer=2, n_head=2, n_embd=32),
        train=TrainConfig(**train),
        data=DataConfig(path=str(data_path)),
    )


def sharpen(model: torch.nn.Module) -> torch.nn.Module:
    """Scale a random GPT's head, embedding and attention up, in place, so that its greedy choices are far from ties
    (kernel differences between two implementations then cannot flip one)."""
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
        model.transformer.wte.weight.mul_(5)
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(5)
        if "bigram" in model.transformer:  # zero at initialisation: give the pairs a say
            model.transformer.bigram.weight.normal_(0.0, 1.0)
    return model


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A headless Chromium driven by selenium (the playground tests skip themselves without one)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}", "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
