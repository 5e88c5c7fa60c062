"""The eager and the fused attention paths agree with a naive reference and with each other."""

from __future__ import annotations

import pytest
import torch

from kvlens.components.attention_context import build_attention_context
from kvlens.components.attention_math import (
    attention_pattern,
    attention_scores,
    fused_attention,
    mix_values,
)


def naive(q, k, v, allowed):
    """Repeat kv heads, explicit softmax over allowed keys; ``allowed``: [batch, 1, n, kv]."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v


def full_allowed(full_mask, n_new):
    kv = full_mask.shape[1]
    query_index = torch.arange(kv - n_new, kv)[:, None]
    key_index = torch.arange(kv)[None, :]
    causal = key_index <= query_index
    return (causal & full_mask.bool()[:, None, None, :]) | (key_index == query_index)


CASES = {
    "prefill": (6, 0, None),
    "decode": (1, 7, None),
    "decode_padded": (1, 7, [[1] * 8, [0, 0, 1, 1, 1, 1, 1, 1]]),
    "chunk_after_cache": (3, 5, None),
    "chunk_padded": (3, 5, [[0, 1, 1, 1, 1, 1, 0, 1], [1, 1, 1, 1, 1, 0, 0, 1]]),
}


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("case", list(CASES))
def test_paths_agree_with_reference(heads, case) -> None:
    n_heads, n_kv = heads
    n_new, cached, rows = CASES[case]
    kv = n_new + cached
    full_mask = torch.tensor(rows) if rows is not None else torch.ones(2, kv, dtype=torch.long)
    has_padding = rows is not None
    ctx = build_attention_context(
        n_new, kv, full_mask if has_padding or cached else None, has_padding, torch.device("cpu")
    )
    torch.manual_seed(0)
    q = torch.randn(2, n_heads, n_new, 8)
    # Keys and values as the cache stores them: a view of larger storage.
    k = torch.randn(2, n_kv, kv + 4, 8)[:, :, :kv]
    v = torch.randn(2, n_kv, kv + 4, 8)[:, :, :kv]
    expected = naive(q, k, v, full_allowed(full_mask, n_new))
    fused = fused_attention(q, k, v, ctx.attn_mask, ctx.is_causal)
    scores = attention_scores(q, k, ctx.attn_mask, ctx.is_causal)
    eager = mix_values(attention_pattern(scores), v)
    assert torch.allclose(fused, expected, atol=1e-5)
    assert torch.allclose(eager, expected, atol=1e-5)


def test_context_picks_cheapest_mask() -> None:
    cpu = torch.device("cpu")
    decode = build_attention_context(1, 9, torch.ones(1, 9), False, cpu)
    assert decode.attn_mask is None and not decode.is_causal
    prefill = build_attention_context(5, 5, None, False, cpu)
    assert prefill.attn_mask is None and prefill.is_causal
    chunk = build_attention_context(2, 5, torch.ones(1, 5), False, cpu)
    assert chunk.attn_mask is not None and chunk.attn_mask.shape == (1, 1, 2, 5)
    assert chunk.attn_mask[0, 0].tolist() == [[True] * 4 + [False], [True] * 5]


def test_padded_context_hides_pad_keys_but_lets_a_query_see_itself() -> None:
    mask = torch.tensor([[0, 1, 0, 1]])
    ctx = build_attention_context(4, 4, mask, True, torch.device("cpu"))
    assert ctx.attn_mask is not None
    assert ctx.attn_mask[0, 0].int().tolist() == [
        [1, 0, 0, 0],  # a pad query sees only itself
        [0, 1, 0, 0],
        [0, 1, 1, 0],
        [0, 1, 0, 1],
    ]
    with pytest.raises(ValueError, match="full_mask"):
        build_attention_context(4, 4, None, True, torch.device("cpu"))


def test_pattern_of_a_row_with_no_allowed_key_is_zero() -> None:
    scores = torch.tensor([[[[0.0, 1.0], [float("-inf"), float("-inf")]]]])
    pattern = attention_pattern(scores)
    assert torch.equal(pattern[0, 0, 1], torch.zeros(2))
    assert torch.allclose(pattern[0, 0, 0].sum(), torch.tensor(1.0))
