"""Speculative decoding (``kvlens.speculative``): exactly the target's greedy tokens."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from tests.helpers import make_hf_model, model_pair, tokens_for

from kvlens.model import HookedTransformer
from kvlens.speculative import SpeculativeStats, speculative_generate

NEW = 20


@functools.cache
def drafts() -> dict[str, HookedTransformer]:
    """A different random model, and the target with its weights perturbed (agrees often)."""
    _, target = model_pair("llama")
    other = HookedTransformer.from_hf_model(make_hf_model("llama", seed=7, num_hidden_layers=1))
    noisy = copy.deepcopy(target)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in noisy.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=gen))
    return {"other": other, "noisy": noisy}


def greedy(model, prompt, n=NEW, **kwargs):
    return model.generate(prompt, max_new_tokens=n, do_sample=False, verbose=False, **kwargs)


@pytest.mark.parametrize("draft_name", ["other", "noisy"])
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("seed", [0, 1])
def test_equals_greedy(draft_name, k, seed):
    _, target = model_pair("llama")
    prompt = tokens_for(seed, 1, 6)
    stats = SpeculativeStats()
    got = greedy(
        target,
        prompt,
        stop_at_eos=False,
        draft_model=drafts()[draft_name],
        num_speculative_tokens=k,
        speculative_stats=stats,
    )
    assert got.tolist() == greedy(target, prompt, stop_at_eos=False).tolist()
    assert stats.new_tokens == NEW
    assert 0.0 <= stats.acceptance_rate <= 1.0


def test_noisy_draft_is_partly_accepted():
    _, target = model_pair("llama")
    stats = SpeculativeStats()
    speculative_generate(target, drafts()["noisy"], tokens_for(2, 1, 6), NEW, 4, stats=stats)
    assert 0.0 < stats.acceptance_rate < 1.0


def test_self_draft_accepts_everything():
    _, target = model_pair("llama")
    stats = SpeculativeStats()
    new = speculative_generate(target, target, tokens_for(3, 1, 6), NEW, 4, stats=stats)
    assert stats.acceptance_rate == 1.0
    assert stats.rounds < NEW // 4 + 1
    assert new.tolist() == greedy(target, tokens_for(3, 1, 6), stop_at_eos=False)[:, 6:].tolist()


@pytest.mark.parametrize("eos_at", [0, 4, 9])
def test_stops_at_eos_like_greedy(eos_at):
    _, target = model_pair("llama")
    prompt = tokens_for(4, 1, 6)
    eos = greedy(target, prompt, stop_at_eos=False)[0, 6 + eos_at].item()
    expected = greedy(target, prompt, eos_token_id=eos)
    got = greedy(target, prompt, eos_token_id=eos, draft_model=drafts()["noisy"])
    assert got.tolist() == expected.tolist()
    assert got[0, -1].item() == eos


def test_refuses_bad_arguments():
    _, target = model_pair("llama")
    prompt = tokens_for(0, 1, 4)
    with pytest.raises(ValueError, match="do_sample=False"):
        target.generate(prompt, draft_model=target, stop_at_eos=False, verbose=False)
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        speculative_generate(target, target, prompt, 4, num_speculative_tokens=0)
    small_vocab = HookedTransformer.from_hf_model(make_hf_model("llama", vocab_size=50))
    with pytest.raises(ValueError, match="vocabulary"):
        speculative_generate(target, small_vocab, prompt, 4)


@pytest.mark.slow
def test_smollm2_drafting_for_itself_equals_greedy():
    model = HookedTransformer.from_pretrained()
    prompt = model.to_tokens("The capital of France is")
    stats = SpeculativeStats()
    got = greedy(model, prompt, n=16, draft_model=model, speculative_stats=stats)
    assert got.tolist() == greedy(model, prompt, n=16).tolist()
    assert stats.acceptance_rate == 1.0
