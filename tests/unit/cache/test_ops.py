"""Tests for the cache's operations (its methods): clone, select, repeat_interleave, crop, reset."""

from __future__ import annotations

import pytest
import torch

from kvlens import KeyValueCache, ModelConfig

LAYERS, BATCH, HEADS, D_HEAD = 2, 3, 2, 4


def tiny_cfg() -> ModelConfig:
    return ModelConfig(
        n_layers=LAYERS, d_model=8, n_heads=HEADS, d_head=D_HEAD, n_ctx=64, d_vocab=16
    )


def filled(pos: int = 5, batch: int = BATCH, capacity: int = 0) -> KeyValueCache:
    """A cache holding ``pos`` random positions, a mask with zeros, and its tokens."""
    cache = KeyValueCache.init_cache(tiny_cfg(), "cpu", batch_size=batch, capacity=capacity)
    for entry in cache.entries:
        shape = (batch, pos, HEADS, D_HEAD)
        entry.append(torch.randn(shape), torch.randn(shape))
    mask = torch.ones(batch, pos, dtype=torch.long)
    mask[0, :2] = 0
    cache.append_attention_mask(mask)
    cache.tokens = torch.randint(0, 16, (batch, pos))
    return cache


def snapshot(cache: KeyValueCache) -> list[torch.Tensor]:
    out = [cache.previous_attention_mask.clone()]
    for entry in cache.entries:
        out += [entry.past_keys.clone(), entry.past_values.clone()]
    if cache.tokens is not None:
        out.append(cache.tokens.clone())
    return out


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_clone_is_independent():
    cache = filled()
    copy = cache.clone()
    assert_same(snapshot(copy), snapshot(cache))
    assert copy.capacity == cache.capacity and copy.cfg is cache.cfg
    before = snapshot(cache)
    for entry in copy.entries:
        entry.past_keys.zero_()
        entry.append(torch.ones(BATCH, 1, HEADS, D_HEAD), torch.ones(BATCH, 1, HEADS, D_HEAD))
    copy.append_attention_mask(torch.ones(BATCH, 1, dtype=torch.long))
    copy.tokens[0, 0] = 99
    assert_same(snapshot(cache), before)
    assert cache.seq_len == 5 and copy.seq_len == 6


def test_clone_keeps_frozen():
    cache = filled().freeze()
    copy = cache.clone()
    assert copy.frozen and all(e.frozen for e in copy.entries)


@pytest.mark.parametrize("indices", [[2, 0], [1, 1, 1, 0], [0, 1, 2], [2, 1, 0]])
def test_select_picks_rows_everywhere(indices):
    cache = filled()
    before = snapshot(cache)
    capacity = cache.capacity
    assert cache.select(torch.tensor(indices)) is cache
    idx = torch.tensor(indices)
    assert_same(snapshot(cache), [t[idx] for t in before])
    assert cache.batch_size == len(indices)
    assert cache.capacity == capacity


def test_select_same_batch_reuses_storage():
    cache = filled(capacity=32)
    storage = cache.entries[0]._keys.data_ptr()
    cache.select([2, 0, 1])
    assert cache.entries[0]._keys.data_ptr() == storage


def test_repeat_interleave():
    cache = filled()
    before = snapshot(cache)
    cache.repeat_interleave(2)
    idx = torch.tensor([0, 0, 1, 1, 2, 2])
    assert_same(snapshot(cache), [t[idx] for t in before])
    assert cache.batch_size == 6


def test_crop_keeps_a_prefix_in_o1():
    cache = filled(pos=6, capacity=32)
    before = snapshot(cache)
    storage = cache.entries[1]._values.data_ptr()
    cache.crop(4)
    assert cache.seq_len == 4
    assert_same(snapshot(cache), [t[:, :4] for t in before])
    assert cache.entries[1]._values.data_ptr() == storage
    cache.crop(-1)
    assert_same(snapshot(cache), [t[:, :3] for t in before])
    cache.crop(-3)
    assert cache.seq_len == 0 and cache.tokens is not None and cache.tokens.shape == (BATCH, 0)


def test_crop_then_append_overwrites_the_dropped_positions():
    cache = filled(pos=4)
    kept = snapshot(cache)
    cache.crop(2)
    new = torch.randn(BATCH, 1, HEADS, D_HEAD)
    for entry in cache.entries:
        keys, _ = entry.append(new, new)
        assert torch.equal(keys[:, 2:], new)
    cache.append_attention_mask(torch.ones(BATCH, 1, dtype=torch.long))
    assert cache.seq_len == 3
    assert torch.equal(cache.previous_attention_mask[:, :2], kept[0][:, :2])
    assert cache.previous_attention_mask[:, 2].tolist() == [1] * BATCH


def test_reset_keeps_storage():
    cache = filled(capacity=32)
    nbytes = cache.nbytes
    cache.reset()
    assert cache.seq_len == 0 and cache.previous_attention_mask.shape == (BATCH, 0)
    assert cache.tokens is None and cache.nbytes == nbytes and cache.nbytes_used == 0


def test_chat_cycles_keep_nbytes_bounded():
    """100 turns of append-then-rollback never grow the storage past the first turns' need."""
    cache = filled(pos=4, batch=1)
    sizes = []
    for turn in range(100):
        n = 3 + turn % 5
        for entry in cache.entries:
            new = torch.randn(1, n, HEADS, D_HEAD)
            entry.append(new, new)
        cache.append_attention_mask(torch.ones(1, n, dtype=torch.long))
        cache.crop(-(n - 1))
        sizes.append(cache.nbytes)
    assert cache.seq_len == 4 + 100
    assert max(sizes) == sizes[-1]
    assert cache.nbytes <= 2 * (cache.nbytes_used + 8 * cache.entries[0].nbytes // cache.capacity)


# Errors leave the cache unchanged ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("indices", "error", "match"),
    [
        ([0, 3], IndexError, "3 rows"),
        ([-1], IndexError, "valid: 0 to 2"),
        ([], ValueError, "empty"),
        (torch.tensor([[0, 1]]), ValueError, "1-D"),
        (torch.tensor([0.0, 1.0]), TypeError, "integers"),
    ],
)
def test_select_rejects_bad_indices(indices, error, match):
    cache = filled()
    before = snapshot(cache)
    with pytest.raises(error, match=match):
        cache.select(indices)
    assert_same(snapshot(cache), before)


@pytest.mark.parametrize("length", [6, -6, 100])
def test_crop_beyond_the_length_raises(length):
    cache = filled(pos=5)
    before = snapshot(cache)
    with pytest.raises(ValueError, match=r"cannot crop a cache of 5 positions"):
        cache.crop(length)
    assert_same(snapshot(cache), before)


@pytest.mark.parametrize("repeats", [0, -1, 1.5])
def test_repeat_interleave_rejects_bad_counts(repeats):
    cache = filled()
    with pytest.raises(ValueError, match="repeats"):
        cache.repeat_interleave(repeats)
    assert cache.batch_size == BATCH


def test_uneven_layers_are_refused():
    cache = filled()
    new = torch.randn(BATCH, 1, HEADS, D_HEAD)
    cache.entries[0].append(new, new)
    with pytest.raises(ValueError, match="extended unevenly"):
        cache.crop(2)
