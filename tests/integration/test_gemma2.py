"""Gemma 2 from HF: soft caps, norms after attention and the MLP, the folded embedding scale, local
and global layers, hooks (fp32; sliding-window parity and decoding are in test_sliding_window)."""

from __future__ import annotations

import functools
import math
from typing import Any

import pytest
import torch
from tests.helpers import hf_positions, make_hf_model, padding_mask, tokens_for

from kvlens.cache import KeyValueCache
from kvlens.model import HookedTransformer

ATOL = 1e-4
CAP = 3.0  # both soft caps of the helpers' tiny Gemma 2
WINDOW = 6


@functools.cache
def gemma2_pair(**overrides: Any) -> tuple[Any, HookedTransformer]:
    hf_model = make_hf_model("gemma2", **overrides)
    return hf_model, HookedTransformer.from_hf_model(hf_model)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@torch.no_grad()
def test_logits_match_hf_and_the_caps_bend_them() -> None:
    hf_model, model = gemma2_pair()
    tokens = tokens_for(50, 2, 16)
    expected = hf_model(tokens).logits
    got = model(tokens)
    assert max_diff(got, expected) <= ATOL
    assert got.abs().max().item() <= CAP
    # Each cap changes the logits, so the match above depends on both (same weights: same seed).
    no_attn_cap = make_hf_model("gemma2", attn_logit_softcapping=None)(tokens).logits
    no_final_cap = make_hf_model("gemma2", final_logit_softcapping=None)(tokens).logits
    assert max_diff(no_attn_cap, expected) > 1e-2
    assert max_diff(no_final_cap, expected) > 1e-1
    hf_uncapped, uncapped = gemma2_pair(attn_logit_softcapping=None, final_logit_softcapping=None)
    assert uncapped.cfg.attn_scores_soft_cap == uncapped.cfg.output_logits_soft_cap == -1
    assert max_diff(uncapped(tokens), hf_uncapped(tokens).logits) <= ATOL


@pytest.mark.parametrize("overrides", [{"tie_word_embeddings": False}, {"attention_bias": True}])
@torch.no_grad()
def test_untied_unembedding_and_attention_bias(overrides: dict[str, Any]) -> None:
    hf_model = make_hf_model("gemma2", **overrides)
    model = HookedTransformer.from_hf_model(hf_model)
    tokens = tokens_for(51, 2, 14)
    mask = padding_mask(2, 14, "left", pads=(0, 4))
    expected = hf_model(tokens, attention_mask=mask, position_ids=hf_positions(mask)).logits
    got = model(tokens, attention_mask=mask)
    assert (got - expected)[mask.bool()].abs().max().item() <= ATOL


def test_weights_fold_the_embedding_scale_and_the_norm_offset() -> None:
    hf_model, model = gemma2_pair()
    embed = hf_model.model.embed_tokens.weight
    assert torch.equal(model.W_E, embed * torch.tensor(math.sqrt(32.0)))
    assert torch.equal(model.W_U, embed.T)  # tied, and not scaled
    layer = hf_model.model.layers[1]
    block = model.blocks[1]
    pairs = {
        "ln1": layer.input_layernorm,
        "ln1_post": layer.post_attention_layernorm,
        "ln2": layer.pre_feedforward_layernorm,
        "ln2_post": layer.post_feedforward_layernorm,
    }
    for name, hf_norm in pairs.items():
        assert torch.equal(getattr(block, name).w, 1.0 + hf_norm.weight), name
    assert torch.equal(model.ln_final.w, 1.0 + hf_model.model.norm.weight)


@torch.no_grad()
def test_residual_stream_matches_hf_hidden_states() -> None:
    """The layout (norms after attention and the MLP, before they join the residual stream) is
    HF's: every layer's output equals HF's hidden state."""
    hf_model, model = gemma2_pair()
    tokens = tokens_for(52, 2, 12)
    hidden = hf_model(tokens, output_hidden_states=True).hidden_states
    _, cache = model.run_with_cache(tokens)
    assert max_diff(cache["hook_embed"], hidden[0]) <= ATOL
    for i in range(model.cfg.n_layers - 1):  # HF's last hidden state is after the final norm
        assert max_diff(cache[f"blocks.{i}.hook_resid_post"], hidden[i + 1]) <= ATOL


@torch.no_grad()
def test_post_norm_hooks_fire_and_feed_the_outputs() -> None:
    _, model = gemma2_pair()
    tokens = tokens_for(53, 2, 10)
    logits, cache = model.run_with_cache(tokens)
    assert max_diff(logits, model(tokens)) <= 1e-5  # hooked norms take other float steps
    for i, block in enumerate(model.blocks):
        for norm in ("ln1_post", "ln2_post"):
            for hook in ("hook_scale", "hook_normalized"):
                assert f"blocks.{i}.{norm}.{hook}" in cache
        attn_out = cache[f"blocks.{i}.ln1_post.hook_normalized"] * block.ln1_post.w
        mlp_out = cache[f"blocks.{i}.ln2_post.hook_normalized"] * block.ln2_post.w
        assert max_diff(cache[f"blocks.{i}.hook_attn_out"], attn_out) <= 1e-5
        assert max_diff(cache[f"blocks.{i}.hook_mlp_out"], mlp_out) <= 1e-5
        assert cache[f"blocks.{i}.ln1_post.hook_scale"].shape == (2, 10, 1)


@torch.no_grad()
def test_attention_scores_are_soft_capped_and_windowed() -> None:
    _, model = gemma2_pair()
    n = 14
    _, cache = model.run_with_cache(tokens_for(54, 2, n))
    query = torch.arange(n)[:, None]
    key = torch.arange(n)[None, :]
    for i in range(model.cfg.n_layers):
        scores = cache[f"blocks.{i}.attn.hook_attn_scores"]
        seen = key <= query
        if model.cfg.layer_window(i) is not None:
            seen &= query - key < WINDOW
        assert torch.equal(torch.isfinite(scores), seen.expand_as(scores)), i
        finite = scores[seen.expand_as(scores)]
        assert finite.abs().max().item() <= CAP
    windows = [model.cfg.layer_window(i) for i in range(model.cfg.n_layers)]
    assert windows == [WINDOW, None, WINDOW]


@torch.no_grad()
def test_cached_equals_uncached_op_by_op() -> None:
    """The op-by-op decode path Gemma 2 takes (no fused native layer) gives the same logits."""
    _, model = gemma2_pair()
    assert all(block.decode_plan is None for block in model.blocks)
    assert all(block.decode_plan_reason for block in model.blocks)
    tokens = tokens_for(55, 2, 20)
    expected = model(tokens)
    cache = KeyValueCache.init_cache(model.cfg, None, batch_size=2)
    pieces = [model(tokens[:, :9], past_kv_cache=cache)]
    pieces += [model(tokens[:, i : i + 1], past_kv_cache=cache) for i in range(9, 20)]
    assert max_diff(torch.cat(pieces, dim=1), expected) <= ATOL
