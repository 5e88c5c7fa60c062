"""Tests for ``kvlens.cache.shared``: one frozen batch-1 prefix shared by many rows."""

from __future__ import annotations

import pytest
import torch

from kvlens import KeyValueCache, KeyValueCacheEntry, ModelConfig, SharedPrefixCache
from kvlens.cache.shared import is_shareable_prefix, share_frozen_prefix

LAYERS, KV_HEADS, D_HEAD, PREFIX = 2, 2, 8, 5


def filled_prefix(mask: torch.Tensor | None = None, batch: int = 1) -> KeyValueCache:
    """A frozen cache holding ``PREFIX`` random positions in every layer."""
    shape = (batch, PREFIX, KV_HEADS, D_HEAD)
    entries = [KeyValueCacheEntry(torch.randn(shape), torch.randn(shape)) for _ in range(LAYERS)]
    return KeyValueCache(entries, mask).freeze()


def test_from_prefix_builds_empty_suffixes_beside_the_prefix() -> None:
    prefix = filled_prefix()
    shared = SharedPrefixCache.from_prefix(prefix, 3, capacity=10)
    assert shared.prefix is prefix
    assert shared.batch_size == 3 and len(shared) == LAYERS
    assert shared.prefix_length == PREFIX and shared.prefix_positions == PREFIX
    assert shared.prefix_mask is None
    assert shared.seq_len == PREFIX and shared.suffix.seq_len == 0
    for entry, prefix_entry in zip(shared, prefix, strict=True):
        assert entry.prefix is prefix_entry
        assert entry.suffix.batch_size == 3 and entry.suffix.capacity == 10
        # The prefix is read in place: same storage, storage layout.
        assert entry.prefix_keys.shape == (1, KV_HEADS, PREFIX, D_HEAD)
        assert entry.prefix_keys.data_ptr() == prefix_entry.past_keys.data_ptr()
    assert shared.nbytes == prefix.nbytes + shared.suffix.nbytes


def test_append_goes_to_the_suffix_only() -> None:
    prefix = filled_prefix()
    before = prefix[0].past_keys.clone()
    shared = SharedPrefixCache.from_prefix(prefix, 3)
    new = torch.randn(3, 2, KV_HEADS, D_HEAD)
    keys, values = shared[0].append(new, new + 1)
    assert torch.equal(keys, new) and torch.equal(values, new + 1)
    assert shared[0].suffix.length == 2 and prefix[0].length == PREFIX
    assert torch.equal(prefix[0].past_keys, before)


def test_padded_prefix_counts_its_real_tokens() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    shared = SharedPrefixCache.from_prefix(filled_prefix(mask), 2)
    assert shared.prefix_positions == 3
    assert shared.prefix_mask is not None
    assert shared.prefix_mask.tolist() == [[[[False, False, True, True, True]]]]


def test_freeze_reserve_and_repr() -> None:
    shared = SharedPrefixCache.from_prefix(filled_prefix(), 2)
    assert shared.freeze() is shared and shared.frozen and shared.suffix.frozen
    assert shared.unfreeze() is shared and not shared.frozen
    shared.reserve(PREFIX + 20)
    assert shared.suffix.capacity >= 20
    assert "prefix_length=5" in repr(shared)


def test_check_prefix_notices_an_unfrozen_prefix() -> None:
    prefix = filled_prefix()
    shared = SharedPrefixCache.from_prefix(prefix, 2)
    shared.check_prefix()
    prefix.unfreeze()
    with pytest.raises(ValueError, match="shared prefix changed"):
        shared.check_prefix()


def test_invalid_prefixes_and_suffixes() -> None:
    with pytest.raises(ValueError, match="batch size 1, this one has 2"):
        SharedPrefixCache.from_prefix(filled_prefix(batch=2), 3)
    with pytest.raises(ValueError, match="not frozen"):
        SharedPrefixCache.from_prefix(filled_prefix().unfreeze(), 3)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        SharedPrefixCache.from_prefix(filled_prefix(), 0)
    cfg = ModelConfig(n_layers=LAYERS, d_model=32, n_heads=4, d_head=D_HEAD, n_ctx=64, d_vocab=16)
    wrong_heads = KeyValueCache.init_cache(cfg, "cpu", batch_size=3)  # 4 kv heads, not 2
    with pytest.raises(ValueError, match="suffix layer 0 stores"):
        SharedPrefixCache(filled_prefix(), wrong_heads)
    one_layer = KeyValueCache.init_cache(cfg.replace(n_layers=1), "cpu", batch_size=3)
    with pytest.raises(ValueError, match="prefix has 2 layers and suffix 1"):
        SharedPrefixCache(filled_prefix(), one_layer)


def test_share_frozen_prefix_decides_per_forward() -> None:
    prefix = filled_prefix()
    assert share_frozen_prefix(None, 3) is None
    assert share_frozen_prefix(prefix, 1) is prefix  # batch 1 on batch 1: the cache itself
    shared = share_frozen_prefix(prefix, 3)
    assert isinstance(shared, SharedPrefixCache) and shared.batch_size == 3
    assert share_frozen_prefix(shared, 3) is shared
    with pytest.raises(ValueError, match="freeze it first"):
        share_frozen_prefix(filled_prefix().unfreeze(), 3)
    with pytest.raises(ValueError, match="batch size 2 and the input 3 rows"):
        share_frozen_prefix(filled_prefix(batch=2), 3)
    assert is_shareable_prefix(prefix) and not is_shareable_prefix(prefix.unfreeze())
    assert not is_shareable_prefix(shared) and not is_shareable_prefix(None)
