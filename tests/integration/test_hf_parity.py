"""Logits equal HF's for every supported family, with and without left padding (fp32)."""

from __future__ import annotations

import pytest
import torch
from tests.helpers import (
    FAMILIES,
    hf_positions,
    make_hf_model,
    model_pair,
    padding_mask,
    tokens_for,
)

from kvlens.model import HookedTransformer

ATOL = 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_hf(family: str) -> None:
    hf_model, model = model_pair(family)
    tokens = tokens_for(0, 2, 16)
    with torch.no_grad():
        expected = hf_model(tokens).logits
        got = model(tokens)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= ATOL


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_hf_left_padded(family: str) -> None:
    hf_model, model = model_pair(family)
    tokens = tokens_for(1, 3, 16)
    mask = padding_mask(3, 16, "left", pads=(0, 3, 7))
    with torch.no_grad():
        expected = hf_model(tokens, attention_mask=mask, position_ids=hf_positions(mask)).logits
        got = model(tokens, attention_mask=mask)
    real = mask.bool()
    assert (got - expected)[real].abs().max().item() <= ATOL


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_row_equals_unpadded_row(family: str) -> None:
    """A left-padded row's real tokens get the logits they get alone (pads take no position)."""
    _, model = model_pair(family)
    tokens = tokens_for(2, 2, 12)
    mask = padding_mask(2, 12, "left", pads=(0, 5))
    with torch.no_grad():
        batched = model(tokens, attention_mask=mask)
        alone = model(tokens[1:, 5:])
    assert torch.allclose(batched[1, 5:], alone[0], atol=ATOL)


def test_gpt_neox_sequential_residual_matches_hf() -> None:
    hf_model = make_hf_model("pythia", use_parallel_residual=False, rotary_pct=1.0)
    model = HookedTransformer.from_hf_model(hf_model)
    assert not model.cfg.parallel_attn_mlp and "blocks.0.hook_resid_mid" in model.hook_dict
    tokens = tokens_for(3, 2, 10)
    with torch.no_grad():
        diff = (model(tokens) - hf_model(tokens).logits).abs().max().item()
    assert diff <= ATOL


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_loss_matches_hf(family: str) -> None:
    hf_model, model = model_pair(family)
    tokens = tokens_for(4, 2, 12)
    with torch.no_grad():
        expected = hf_model(tokens, labels=tokens).loss
        logits, loss = model(tokens, return_type="both")
    assert torch.allclose(loss, expected, atol=1e-5)
    assert logits.shape == (2, 12, hf_model.config.vocab_size)


def test_conversion_copies_weights() -> None:
    """The kvlens model owns its weights: editing the HF model afterwards changes nothing."""
    hf_model = make_hf_model("qwen2")
    model = HookedTransformer.from_hf_model(hf_model)
    tokens = tokens_for(5, 1, 6)
    with torch.no_grad():
        before = model(tokens)
        for param in hf_model.parameters():
            param.zero_()
        after = model(tokens)
    assert torch.equal(before, after)
    # Tied checkpoint: W_U is a separate contiguous copy of W_E's transpose.
    assert model.W_U.is_contiguous() and torch.equal(model.W_U, model.W_E.T)
    assert model.W_U.data_ptr() != model.W_E.data_ptr()
