import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scratchgpt.config import ModelConfig
from scratchgpt.evaluate import bits_per_character, evaluate_split
from scratchgpt.model import GPT, Bigram


def test_bits_per_character_by_hand():
    assert bits_per_character(math.log(2), 100, 100) == pytest.approx(1.0)
    assert bits_per_character(math.log(4), 50, 100) == pytest.approx(1.0)  # 2 bits per token, 2 chars per token


@pytest.mark.parametrize("n", [17, 64, 65, 100])  # with and without a shorter last window
def test_bigram_eval_scores_every_consecutive_pair_once(n):
    """A bigram's loss depends only on the current token, so windows must not matter."""
    torch.manual_seed(0)
    model = Bigram(ModelConfig(model_type="bigram", vocab_size=7, block_size=16))
    torch.nn.init.normal_(model.logits_table.weight, std=1.0)
    ids = np.random.default_rng(0).integers(0, 7, size=n).astype(np.uint8)
    result = evaluate_split(model, ids, n_chars=n, batch_size=3)
    logprobs = F.log_softmax(model.logits_table.weight, dim=-1)
    expected = -np.mean([logprobs[ids[i], ids[i + 1]].item() for i in range(n - 1)])
    assert result.val_tokens == n - 1
    assert result.val_loss == pytest.approx(expected, rel=1e-5)
    assert result.val_perplexity == pytest.approx(math.exp(expected), rel=1e-5)


def test_gpt_eval_uses_consecutive_non_overlapping_windows():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=9, block_size=8, n_layer=1, n_head=2, n_embd=16)).eval()
    ids = np.random.default_rng(1).integers(0, 9, size=30).astype(np.uint8)
    data = torch.from_numpy(ids.astype(np.int64))
    total = 0.0
    for start in (0, 8, 16, 24):  # 29 targets: windows of 8, 8, 8 and 5
        length = min(8, 29 - start)
        logits = model(data[None, start : start + length])[0][0]
        total += F.cross_entropy(logits, data[start + 1 : start + 1 + length], reduction="sum").item()
    result = evaluate_split(model, ids, n_chars=30, batch_size=2)
    assert result.val_loss == pytest.approx(total / 29, rel=1e-5)
    assert model.training is False
