import math

import pytest
import torch

from scratchgpt.config import ModelConfig
from scratchgpt.model import GPT
from scratchgpt.sample import generate, sample_next, top_k_filter, top_p_filter

INF = float("inf")


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 4.0, 2.0, 3.0]])
    assert top_k_filter(logits, 2).tolist() == [[-INF, 4.0, -INF, 3.0]]
    assert torch.equal(top_k_filter(logits, None), logits)
    assert torch.equal(top_k_filter(logits, 10), logits)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = lambda p: torch.isfinite(top_p_filter(logits, p))[0].tolist()  # noqa: E731
    assert kept(0.5) == [True, False, False, False]  # 0.5 alone reaches 0.5
    assert kept(0.6) == [True, True, False, False]  # 0.5 + 0.3 = 0.8 >= 0.6
    assert kept(0.85) == [True, True, True, False]
    assert kept(0.01) == [True, False, False, False]  # the top token always stays
    assert kept(1.0) == [True, True, True, True]


def test_top_p_works_on_unsorted_rows_independently():
    logits = torch.tensor([[0.05, 0.15, 0.3, 0.5], [0.3, 0.5, 0.05, 0.15]]).log()
    kept = torch.isfinite(top_p_filter(logits, 0.6)).tolist()
    assert kept == [[False, False, True, True], [True, True, False, False]]


def test_temperature_zero_is_argmax_and_top_k_one_equals_greedy():
    torch.manual_seed(0)
    logits = torch.randn(5, 30)
    greedy = sample_next(logits, temperature=0)
    assert torch.equal(greedy, logits.argmax(-1))
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, temperature=1.3, top_k=1, generator=g), greedy)


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.7, 0.2, 0.1])
    g = torch.Generator().manual_seed(0)
    draws = sample_next(probs.log().expand(20000, 3), generator=g)
    freq = torch.bincount(draws, minlength=3).float() / 20000
    assert torch.allclose(freq, probs, atol=0.015)
    # temperature 0.5 squares the probabilities (then renormalises)
    draws = sample_next(probs.log().expand(20000, 3), temperature=0.5, generator=g)
    expected = probs**2 / (probs**2).sum()
    assert torch.allclose(torch.bincount(draws, minlength=3).float() / 20000, expected, atol=0.015)


def test_negative_temperature_is_refused():
    with pytest.raises(ValueError):
        sample_next(torch.zeros(1, 3), temperature=-1)


def _model():
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16)).eval()


def test_same_seed_same_sample_and_different_seed_differs():
    model = _model()
    idx = torch.zeros(1, 1, dtype=torch.long)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return [int(t) for t in generate(model, idx, 40, temperature=1.0, generator=g)]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_context_is_cropped_to_block_size():
    model = _model()
    idx = torch.randint(11, (1, 30))  # longer than block_size 8
    out = list(generate(model, idx, 3, temperature=0))
    # the first generated token depends only on the last 8 prompt tokens
    expected = model(idx[:, -8:])[0][:, -1].argmax(-1)
    assert len(out) == 3 and torch.equal(out[0], expected)


def test_log_probabilities_sum_to_one_after_filters():
    logits = torch.randn(3, 50)
    filtered = top_p_filter(top_k_filter(logits, 10), 0.9)
    assert torch.allclose(torch.softmax(filtered, -1).sum(-1), torch.ones(3))
    assert (torch.isfinite(filtered).sum(-1) <= 10).all()
    assert math.isfinite(filtered.max().item())


def test_repetition_penalty_by_hand():
    from scratchgpt.sample import repetition_penalty_filter

    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [2.0, -1.0, 0.5, 3.0]])
    previous = torch.tensor([[0, 1, 1], [3, 3, 3]])
    out = repetition_penalty_filter(logits, previous, 2.0)
    # seen tokens: a positive logit is halved, a negative one doubled; unseen ones are untouched
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0], [2.0, -1.0, 0.5, 1.5]]
    assert torch.equal(repetition_penalty_filter(logits, previous, 1.0), logits)
    # greedy picks token 3 without the penalty, token 0 once 3 has been seen and penalised
    assert sample_next(out[1:], temperature=0).item() == 0 and sample_next(logits[1:], temperature=0).item() == 3
