"""Beam search (``kvlens.beam``): Hugging Face's tokens, and never worse than greedy."""

from __future__ import annotations

import pytest
import torch
from tests.helpers import model_pair, tokens_for

from kvlens.beam import beam_search

NEW = 8


def hf_beam(hf_model, prompt, num_beams, eos, **kwargs):
    out = hf_model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        num_beams=num_beams,
        do_sample=False,
        max_new_tokens=NEW,
        eos_token_id=eos,
        pad_token_id=eos,
        **kwargs,
    )
    return out[0, prompt.shape[1] :].tolist()


def greedy_new(model, prompt, n=NEW):
    out = model.generate(
        prompt, max_new_tokens=n, do_sample=False, stop_at_eos=False, verbose=False
    )
    return out[0, prompt.shape[1] :].tolist()


def sequence_logprob(model, prompt, new):
    tokens = torch.cat([prompt, torch.tensor([new])], dim=1)
    with torch.no_grad():
        log_probs = model(tokens).log_softmax(-1)[0, prompt.shape[1] - 1 : -1]
    return float(log_probs.gather(-1, torch.tensor(new)[:, None]).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    ("length_penalty", "early_stopping"), [(1.0, False), (0.5, True), (2.0, "never")]
)
def test_beam_search_matches_hugging_face(seed, length_penalty, early_stopping):
    hf_model, model = model_pair("llama")
    prompt = tokens_for(seed, 1, 5)
    # An EOS that greedy decoding reaches, so that hypotheses finish at different lengths.
    eos = greedy_new(model, prompt)[3]
    expected = hf_beam(
        hf_model,
        prompt,
        4,
        eos,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
    )
    got = model.generate(
        prompt,
        max_new_tokens=NEW,
        do_sample=False,
        eos_token_id=eos,
        num_beams=4,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        verbose=False,
    )
    assert got[0, prompt.shape[1] :].tolist() == expected


def test_one_beam_is_greedy():
    _, model = model_pair("llama")
    prompt = tokens_for(3, 1, 6)
    best = beam_search(model, prompt, NEW, num_beams=1)
    assert best.tokens.tolist() == greedy_new(model, prompt)


@pytest.mark.parametrize("seed", [4, 5, 6])
def test_beam_scores_at_least_greedy(seed):
    _, model = model_pair("llama")
    prompt = tokens_for(seed, 1, 4)
    best = beam_search(model, prompt, NEW, num_beams=4, length_penalty=1.0)
    greedy = greedy_new(model, prompt)
    assert len(best.tokens) == NEW
    assert best.score == pytest.approx(sequence_logprob(model, prompt, best.tokens.tolist()) / NEW)
    assert best.score >= sequence_logprob(model, prompt, greedy) / NEW - 1e-5


def test_beam_search_refuses_sampling_and_batches():
    _, model = model_pair("llama")
    with pytest.raises(ValueError, match="do_sample=False"):
        model.generate(
            tokens_for(0, 1, 4), max_new_tokens=2, num_beams=2, stop_at_eos=False, verbose=False
        )
    with pytest.raises(ValueError, match="one prompt"):
        model.generate(
            tokens_for(0, 2, 4),
            max_new_tokens=2,
            num_beams=2,
            do_sample=False,
            stop_at_eos=False,
            verbose=False,
        )
