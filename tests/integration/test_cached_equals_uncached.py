"""A run split over a key-value cache gives the logits of the same tokens run at once."""

from __future__ import annotations

import pytest
import torch
from tests.helpers import FAMILIES, model_pair, padding_mask, tokens_for

from kvlens.cache import KeyValueCache
from kvlens.model import HookedTransformer

ATOL = 1e-5


def new_cache(model: HookedTransformer, batch: int) -> KeyValueCache:
    return KeyValueCache.init_cache(model.cfg, None, batch_size=batch)


@pytest.fixture(params=FAMILIES)
def model(request: pytest.FixtureRequest) -> HookedTransformer:
    return model_pair(request.param)[1]


@torch.no_grad()
def test_prefill_then_one_token(model: HookedTransformer) -> None:
    tokens = tokens_for(10, 2, 9)
    expected = model(tokens)
    cache = new_cache(model, 2)
    prefill = model(tokens[:, :8], past_kv_cache=cache)
    step = model(tokens[:, 8:], past_kv_cache=cache)
    assert torch.allclose(prefill, expected[:, :8], atol=ATOL)
    assert torch.allclose(step, expected[:, 8:], atol=ATOL)
    assert cache.seq_len == 9 and cache.previous_attention_mask.shape == (2, 9)


@torch.no_grad()
def test_prefill_then_several_tokens(model: HookedTransformer) -> None:
    tokens = tokens_for(11, 2, 15)
    expected = model(tokens)
    cache = new_cache(model, 2)
    pieces = [model(tokens[:, :6], past_kv_cache=cache)]
    for i in range(6, 11):  # one token at a time
        pieces.append(model(tokens[:, i : i + 1], past_kv_cache=cache))
    pieces.append(model(tokens[:, 11:], past_kv_cache=cache))  # then a chunk of four
    assert torch.allclose(torch.cat(pieces, dim=1), expected, atol=ATOL)
    assert cache.seq_len == 15


@pytest.mark.parametrize("prefix_side", ["left", "right", "none"])
@pytest.mark.parametrize("suffix_side", ["left", "right", "none"])
@torch.no_grad()
def test_padded_prefix_and_suffix_over_frozen_cache(
    model: HookedTransformer, prefix_side: str, suffix_side: str
) -> None:
    tokens = tokens_for(12, 3, 14)
    prefix_mask = padding_mask(3, 8, prefix_side, pads=(0, 2, 3))
    suffix_mask = padding_mask(3, 6, suffix_side, pads=(1, 0, 2))
    full_mask = torch.cat((prefix_mask, suffix_mask), dim=1)
    expected = model(tokens, attention_mask=full_mask)
    cache = new_cache(model, 3)
    prefill = model(tokens[:, :8], attention_mask=prefix_mask, past_kv_cache=cache)
    cache.freeze()
    for _ in range(2):  # a frozen cache serves the same suffix twice
        got = model(tokens[:, 8:], attention_mask=suffix_mask, past_kv_cache=cache)
        real = suffix_mask.bool()
        assert torch.allclose(got[real], expected[:, 8:][real], atol=ATOL)
        assert cache.seq_len == 8
        assert torch.equal(cache.previous_attention_mask, prefix_mask.int())
    real_prefix = prefix_mask.bool()
    assert torch.allclose(prefill[real_prefix], expected[:, :8][real_prefix], atol=ATOL)


@torch.no_grad()
def test_two_caches_frozen_at_same_prefix_agree(model: HookedTransformer) -> None:
    tokens = tokens_for(13, 2, 12)
    other_suffix = tokens_for(14, 2, 4)
    caches = [new_cache(model, 2), new_cache(model, 2)]
    for cache in caches:
        model(tokens[:, :8], past_kv_cache=cache)
        cache.freeze()
    first, second = caches
    for a, b in zip(first.entries, second.entries, strict=True):
        assert torch.equal(a.past_keys, b.past_keys) and torch.equal(a.past_values, b.past_values)
    assert torch.equal(first.previous_attention_mask, second.previous_attention_mask)
    assert torch.equal(
        model(tokens[:, 8:], past_kv_cache=first), model(tokens[:, 8:], past_kv_cache=second)
    )
    # The frozen prefix serves a different continuation as a fresh run would.
    got = model(other_suffix, past_kv_cache=first)
    expected = model(torch.cat((tokens[:, :8], other_suffix), dim=1))[:, 8:]
    assert torch.allclose(got, expected, atol=ATOL)


@torch.no_grad()
def test_unfrozen_cache_grows_again(model: HookedTransformer) -> None:
    tokens = tokens_for(15, 2, 11)
    expected = model(tokens)
    cache = new_cache(model, 2)
    model(tokens[:, :8], past_kv_cache=cache)
    cache.freeze()
    model(tokens[:, 8:10], past_kv_cache=cache)
    assert cache.seq_len == 8
    cache.unfreeze()
    model(tokens[:, 8:10], past_kv_cache=cache)
    assert cache.seq_len == 10 and all(e.length == 10 for e in cache.entries)
    step = model(tokens[:, 10:], past_kv_cache=cache)
    assert torch.allclose(step, expected[:, 10:], atol=ATOL)


@torch.no_grad()
def test_masked_new_token_is_as_if_absent(model: HookedTransformer) -> None:
    tokens = tokens_for(16, 2, 12)
    prefix, new, after = tokens[:, :6], tokens[:, 6:11], tokens[:, 11:]
    mask = torch.tensor([[1, 1, 1, 0, 1]]).expand(2, -1)
    kept = new[:, [0, 1, 2, 4]]
    expected = model(torch.cat((prefix, kept, after), dim=1))
    cache = new_cache(model, 2)
    model(prefix, past_kv_cache=cache)
    got = model(new, attention_mask=mask, past_kv_cache=cache)
    assert torch.allclose(got[:, [0, 1, 2, 4]], expected[:, 6:10], atol=ATOL)
    # The masked token stays invisible to later steps.
    assert torch.allclose(model(after, past_kv_cache=cache), expected[:, 10:], atol=ATOL)
    # Without a cache as well.
    uncached = model(
        torch.cat((prefix, new), dim=1),
        attention_mask=torch.cat((torch.ones(2, 6, dtype=torch.long), mask), dim=1),
    )
    assert torch.allclose(uncached[:, [6, 7, 8, 10]], expected[:, 6:10], atol=ATOL)


@torch.no_grad()
def test_start_at_layer_with_cache(model: HookedTransformer) -> None:
    """Running blocks [0, 1) then [1, n) over one cache equals running them all."""
    tokens = tokens_for(17, 3, 10)
    mask = padding_mask(3, 8, "left")
    reference = new_cache(model, 3)
    expected = [
        model(tokens[:, :8], attention_mask=mask, past_kv_cache=reference),
        model(tokens[:, 8:], past_kv_cache=reference),
    ]
    cache = new_cache(model, 3)
    resid = model(tokens[:, :8], attention_mask=mask, past_kv_cache=cache, stop_at_layer=1)
    assert cache[0].length == 8 and cache[1].length == 0
    got = [model(resid, past_kv_cache=cache, start_at_layer=1)]
    resid = model(tokens[:, 8:], past_kv_cache=cache, stop_at_layer=1)
    got.append(model(resid, past_kv_cache=cache, start_at_layer=1))
    real = mask.bool()
    assert torch.allclose(got[0][real], expected[0][real], atol=ATOL)
    assert torch.allclose(got[1], expected[1], atol=ATOL)
    assert [e.length for e in cache.entries] == [e.length for e in reference.entries]
    assert torch.equal(cache.previous_attention_mask, reference.previous_attention_mask)
