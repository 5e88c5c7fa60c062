"""Cascade attention over a shared prefix equals softmax attention over prefix ++ suffix."""

from __future__ import annotations

import pytest
import torch

from kvlens.components import cascade
from kvlens.components.attention_context import causal_mask
from kvlens.components.attention_math import attention_pattern
from kvlens.components.cascade import (
    cascade_attention,
    merge_partials,
    mix_prefix_values,
    prefix_scores,
    suffix_attention,
)

D_HEAD = 8
HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}


def naive(q, prefix_k, prefix_v, prefix_mask, suffix_k, suffix_v, suffix_mask):
    """Copy the prefix into every row, repeat kv heads, softmax over the allowed keys."""
    batch, n_heads, n_new, _ = q.shape
    group = n_heads // suffix_k.shape[1]
    k = torch.cat((prefix_k.expand(batch, -1, -1, -1), suffix_k), dim=2)
    v = torch.cat((prefix_v.expand(batch, -1, -1, -1), suffix_v), dim=2)
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    n_prefix = prefix_k.shape[2]
    if prefix_mask is None:
        prefix_mask = torch.ones(1, 1, 1, n_prefix, dtype=torch.bool)
    allowed = torch.cat(
        (prefix_mask.expand(batch, 1, n_new, -1), suffix_mask.expand(batch, 1, n_new, -1)), -1
    )
    scores = (q @ k.transpose(-1, -2)) / D_HEAD**0.5
    pattern = attention_pattern(scores.masked_fill(~allowed, float("-inf")))
    return pattern @ v


def tensors(heads: str, batch: int, n_new: int, n_prefix: int, n_suffix: int, seed: int = 0):
    n_heads, n_kv = HEADS[heads]
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen)

    q = rand(batch, n_new, n_heads, D_HEAD).transpose(1, 2)  # as attention gives it
    # Keys and values as caches store them: views of larger storage.
    prefix_k = rand(1, n_kv, n_prefix + 5, D_HEAD)[:, :, :n_prefix]
    prefix_v = rand(1, n_kv, n_prefix + 5, D_HEAD)[:, :, :n_prefix]
    suffix_k = rand(batch, n_kv, n_suffix + 3, D_HEAD)[:, :, :n_suffix]
    suffix_v = rand(batch, n_kv, n_suffix + 3, D_HEAD)[:, :, :n_suffix]
    return q, prefix_k, prefix_v, suffix_k, suffix_v


@pytest.fixture(params=["fused", "eager"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "eager":
        monkeypatch.setattr(cascade, "_use_fused", lambda *tensors: False)
    else:
        assert cascade._flash_kernel_available(), "this torch has no usable CPU flash kernel"
    return request.param


def padded_suffix_mask(batch: int, n_new: int, n_suffix: int) -> torch.Tensor:
    """Causal over the suffix, with row 1 missing its first two keys; a query sees itself."""
    keys = torch.ones(batch, n_suffix, dtype=torch.bool)
    keys[1 % batch, :2] = False
    causal = causal_mask(n_new, n_suffix)
    itself = torch.eye(n_suffix, dtype=torch.bool)[n_suffix - n_new :]
    return (causal & keys[:, None, None, :]) | itself


# case: (new tokens, suffix keys, suffix mask padded, suffix plain causal, prefix padded)
CASES = {
    "prefill_causal": (5, 5, False, True, False),
    "decode": (1, 6, False, False, False),
    "decode_padded": (1, 6, True, False, False),
    "chunk_padded": (3, 6, True, False, False),
    "prefix_padded": (5, 5, False, True, True),
}


@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_cascade_equals_attention_over_concatenation(heads: str, case: str, path: str) -> None:
    batch, n_prefix = 3, 11
    n_new, n_suffix, padded, is_causal, prefix_padded = CASES[case]
    q, pk, pv, sk, sv = tensors(heads, batch, n_new, n_prefix, n_suffix)
    prefix_mask = None
    if prefix_padded:
        prefix_mask = torch.ones(1, 1, 1, n_prefix, dtype=torch.bool)
        prefix_mask[..., :4] = False
    suffix_mask = padded_suffix_mask(batch, n_new, n_suffix) if padded else None
    allowed = suffix_mask
    if allowed is None:
        allowed = causal_mask(n_new, n_suffix)[None, None]  # all ones for one new token
    expected = naive(q, pk, pv, prefix_mask, sk, sv, allowed)
    got = cascade_attention(q, pk, pv, prefix_mask, sk, sv, suffix_mask, is_causal)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("heads", list(HEADS))
@torch.no_grad()
def test_fully_masked_rows(heads: str, path: str) -> None:
    """A query with no suffix key sees the prefix only; with no key at all it gets zeros."""
    batch, n_new, n_prefix, n_suffix = 2, 3, 7, 4
    q, pk, pv, sk, sv = tensors(heads, batch, n_new, n_prefix, n_suffix, seed=1)
    suffix_mask = torch.ones(batch, 1, n_new, n_suffix, dtype=torch.bool)
    suffix_mask[0] = False  # row 0 sees no suffix key
    suffix_mask[1, :, 2] = False  # one query of row 1 neither
    got = cascade_attention(q, pk, pv, None, sk, sv, suffix_mask, False)
    assert torch.allclose(got, naive(q, pk, pv, None, sk, sv, suffix_mask), atol=1e-5)
    no_prefix = torch.zeros(1, 1, 1, n_prefix, dtype=torch.bool)
    got = cascade_attention(q, pk, pv, no_prefix, sk, sv, suffix_mask, False)
    assert torch.isfinite(got).all()
    assert torch.equal(got[0], torch.zeros_like(got[0]))
    assert torch.equal(got[1, :, 2], torch.zeros_like(got[1, :, 2]))
    expected = naive(q, pk, pv, no_prefix, sk, sv, suffix_mask)
    assert torch.allclose(got[1, :, :2], expected[1, :, :2], atol=1e-5)


@torch.no_grad()
def test_log_sum_exp_is_that_of_the_scores(path: str) -> None:
    q, _, _, sk, sv = tensors("gqa", 2, 3, 1, 5, seed=2)
    mask = padded_suffix_mask(2, 3, 5)
    _, lse = suffix_attention(q, sk, sv, mask, False)
    scores = (q @ sk.repeat_interleave(2, 1).transpose(-1, -2)) / D_HEAD**0.5
    expected = torch.logsumexp(scores.masked_fill(~mask, float("-inf")), dim=-1)
    assert torch.allclose(lse, expected, atol=1e-5)


def test_merge_of_a_split_equals_the_whole() -> None:
    gen = torch.Generator().manual_seed(3)
    scores = 3 * torch.randn(2, 4, 5, 9, generator=gen)
    values = torch.randn(2, 4, 9, D_HEAD, generator=gen)
    whole = scores.softmax(-1) @ values
    a, b = scores[..., :4], scores[..., 4:]
    got = merge_partials(
        a.softmax(-1) @ values[:, :, :4],
        a.logsumexp(-1),
        b.softmax(-1) @ values[:, :, 4:],
        b.logsumexp(-1),
    )
    assert torch.allclose(got, whole, atol=1e-6)


@pytest.mark.parametrize("heads", list(HEADS))
def test_eager_pieces_match_copied_prefix(heads: str) -> None:
    """Scores against the shared prefix and the pattern-weighted prefix values, per row."""
    batch, n_new, n_prefix = 3, 2, 6
    q, pk, pv, _, _ = tensors(heads, batch, n_new, n_prefix, 1, seed=4)
    group = q.shape[1] // pk.shape[1]
    k = pk.expand(batch, -1, -1, -1).repeat_interleave(group, 1)
    v = pv.expand(batch, -1, -1, -1).repeat_interleave(group, 1)
    mask = torch.ones(1, 1, 1, n_prefix, dtype=torch.bool)
    mask[..., 1] = False
    scores = prefix_scores(q, pk, mask)
    expected = ((q @ k.transpose(-1, -2)) / D_HEAD**0.5).masked_fill(~mask, float("-inf"))
    assert torch.allclose(scores, expected, atol=1e-6)
    pattern = attention_pattern(scores)
    assert torch.allclose(mix_prefix_values(pattern, pv), pattern @ v, atol=1e-6)


def test_gradients_flow_through_both_parts() -> None:
    """Under autograd the matmul path runs (the flash kernel's backward ignores the LSE)."""
    q, pk, pv, sk, sv = tensors("gqa", 2, 3, 5, 3, seed=5)
    leaves = [t.detach().clone().requires_grad_() for t in (q, pk, pv, sk, sv)]
    weights = torch.randn(2, 4, 3, D_HEAD)
    (cascade_attention(*leaves[:3], None, *leaves[3:], None, True) * weights).sum().backward()
    copies = [t.detach().clone().requires_grad_() for t in (q, pk, pv, sk, sv)]
    causal = causal_mask(3, 3)[None, None]
    (naive(*copies[:3], None, *copies[3:], causal) * weights).sum().backward()
    for got, expected in zip(leaves, copies, strict=True):
        assert got.grad is not None and expected.grad is not None
        assert torch.allclose(got.grad, expected.grad, atol=1e-5)
