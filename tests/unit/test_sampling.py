"""Sampling: greedy, temperature, top-k, top-p, frequency penalty, reproducibility, bad settings."""

import pytest
import torch

from kvlens.sampling import SamplingConfig, sample_logits


def test_greedy_when_do_sample_false_or_temperature_zero():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 1.0, 4.9]])
    expected = torch.tensor([1, 0])
    assert torch.equal(sample_logits(logits, SamplingConfig(do_sample=False)), expected)
    assert torch.equal(sample_logits(logits, SamplingConfig(temperature=0.0)), expected)


def test_top_k_one_is_greedy_whatever_the_seed():
    logits = torch.randn(4, 50)
    cfg = SamplingConfig(top_k=1)
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        assert torch.equal(sample_logits(logits, cfg, generator=g), logits.argmax(-1))


def test_top_k_only_samples_among_the_k_best():
    logits = torch.randn(1, 100).repeat(200, 1)
    top3 = set(torch.topk(logits[0], 3).indices.tolist())
    out = sample_logits(logits, SamplingConfig(top_k=3), generator=torch.Generator().manual_seed(0))
    assert set(out.tolist()) <= top3
    assert len(set(out.tolist())) > 1  # it does sample


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None].repeat(500, 1)
    out = sample_logits(
        logits, SamplingConfig(top_p=0.75), generator=torch.Generator().manual_seed(0)
    )
    # 0.5 + 0.3 reaches 0.75: tokens 0 and 1 only, both seen.
    assert set(out.tolist()) == {0, 1}


def test_top_p_always_keeps_the_best_token():
    logits = torch.tensor([[10.0, 0.0, 0.0]])
    out = sample_logits(
        logits, SamplingConfig(top_p=0.01), generator=torch.Generator().manual_seed(0)
    )
    assert out.tolist() == [0]


def test_frequency_penalty_moves_away_from_repeated_tokens():
    logits = torch.tensor([[2.0, 1.9, -5.0]]).repeat(300, 1)
    counts = torch.tensor([[10.0, 0.0, 0.0]]).repeat(300, 1)
    cfg = SamplingConfig(freq_penalty=1.0, top_k=1)
    assert set(sample_logits(logits, cfg, counts).tolist()) == {1}


def test_same_seed_same_samples_other_seed_other_samples():
    logits = torch.randn(8, 64)
    cfg = SamplingConfig(temperature=1.5)
    a = sample_logits(logits, cfg, generator=torch.Generator().manual_seed(7))
    b = sample_logits(logits, cfg, generator=torch.Generator().manual_seed(7))
    c = sample_logits(logits, cfg, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"freq_penalty": -1.0}, "freq_penalty"),
    ],
)
def test_bad_settings_name_the_argument(kwargs, word):
    with pytest.raises(ValueError, match=word):
        SamplingConfig(**kwargs)
