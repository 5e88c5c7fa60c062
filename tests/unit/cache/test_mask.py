"""Tests for ``kvlens.cache.mask``: the attention mask's preallocated storage."""

from __future__ import annotations

import pytest
import torch

from kvlens import KeyValueCache, KeyValueCacheEntry
from kvlens.cache.mask import MASK_DTYPE, MaskStorage


def storage(rows: list[list[int]], capacity: int = 0) -> MaskStorage:
    return MaskStorage(torch.tensor(rows), capacity, torch.device("cpu"))


def test_holds_the_contents_in_int32_storage_of_at_least_the_capacity():
    mask = storage([[0, 1], [1, 1]], capacity=8)
    assert mask.length == 2 and mask.capacity == 8 and mask.batch_size == 2
    assert mask.view().dtype == MASK_DTYPE
    assert mask.view().tolist() == [[0, 1], [1, 1]]
    assert mask.view()._base is mask.storage
    assert mask.nbytes_used == 2 * 2 * 4
    assert storage([[1, 1, 1]], capacity=1).capacity == 3


def test_a_write_counts_only_once_committed():
    mask = storage([[1]])
    full = mask.write(torch.tensor([[0, 1]]))
    assert full.tolist() == [[1, 0, 1]]
    assert mask.length == 1
    mask.commit(advance=False)  # a frozen cache's commit
    assert mask.length == 1
    mask.write(torch.tensor([[0, 1]]))
    mask.commit()
    assert mask.view().tolist() == [[1, 0, 1]]
    mask.commit()  # nothing staged: no change
    assert mask.length == 3


def test_restore_drops_a_staged_write():
    mask = storage([[1, 1]])
    mask.write(torch.tensor([[1]]))
    mask.restore(1)
    mask.commit()
    assert mask.view().tolist() == [[1]]


def test_crop_keeps_the_storage_and_the_next_write_overwrites():
    mask = storage([[1, 0, 1]], capacity=16)
    before = mask.storage
    mask.crop(1)
    assert mask.length == 1 and mask.storage is before
    mask.write(torch.tensor([[1]]))
    mask.commit()
    assert mask.view().tolist() == [[1, 1]]


def test_select_reorders_in_place_or_replaces_storage_of_the_same_capacity():
    mask = storage([[1, 0], [0, 1]], capacity=10)
    before = mask.storage
    mask.select(torch.tensor([1, 0]))
    assert mask.storage is before and mask.view().tolist() == [[0, 1], [1, 0]]
    mask.select(torch.tensor([0, 0, 1]))
    assert mask.capacity == 10 and mask.batch_size == 3
    assert mask.view().tolist() == [[0, 1], [0, 1], [1, 0]]


def test_check_names_the_mask_and_the_batch_size():
    with pytest.raises(ValueError, match="new_mask has batch size 3, this cache stores 2"):
        storage([[1], [1]]).check(torch.ones(3, 1, dtype=torch.long), "new_mask")


def test_check_consistent_names_the_uneven_layer():
    keys = torch.zeros(2, 3, 1, 4)
    cache = KeyValueCache([KeyValueCacheEntry(keys, keys), KeyValueCacheEntry(keys, keys)])
    assert cache.check_consistent() == 3
    cache.crop(-1)
    assert cache.seq_len == 2 and cache.previous_attention_mask.shape == (2, 2)
    cache.repeat_interleave(2)
    assert cache.batch_size == 4
    cache.entries[1].crop(1)
    with pytest.raises(ValueError, match="layer 1 holds 1 positions and layer 0 holds 2"):
        cache.check_consistent()
