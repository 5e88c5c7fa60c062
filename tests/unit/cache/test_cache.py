"""Tests for ``kvlens.cache.cache``: the whole model's key-value cache."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import kvlens
from kvlens import HookedTransformerKeyValueCache, KeyValueCache, KeyValueCacheEntry, ModelConfig
from kvlens.cache import cache as cache_module

LAYERS, BATCH, HEADS, D_HEAD = 3, 2, 4, 8


def tiny_cfg(**changes: object) -> ModelConfig:
    fields: dict[str, object] = dict(
        n_layers=LAYERS, d_model=32, n_heads=HEADS, d_head=D_HEAD, n_ctx=64, d_vocab=16
    )
    fields.update(changes)
    return ModelConfig(**fields)  # type: ignore[arg-type]


def kv(pos: int, batch: int = BATCH, heads: int = HEADS, dtype: torch.dtype = torch.float32):
    shape = (batch, pos, heads, D_HEAD)
    return torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)


@pytest.fixture
def cache() -> KeyValueCache:
    return KeyValueCache.init_cache(tiny_cfg(), "cpu", batch_size=BATCH)


@pytest.fixture
def float64_default() -> Iterator[None]:
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


# init_cache ---------------------------------------------------------------------------------------


def test_init_cache_has_one_empty_entry_per_layer(cache):
    assert len(cache.entries) == LAYERS
    assert len(cache) == LAYERS
    assert all(isinstance(e, KeyValueCacheEntry) for e in cache.entries)
    assert len({id(e) for e in cache.entries}) == LAYERS
    for entry in cache.entries:
        assert entry.past_keys.shape == (BATCH, 0, HEADS, D_HEAD)
        assert entry.past_values.shape == (BATCH, 0, HEADS, D_HEAD)
        assert entry.frozen is False
    assert cache.frozen is False
    assert cache.previous_attention_mask.shape == (BATCH, 0)
    assert cache.previous_attention_mask.dtype == torch.int32
    assert cache.seq_len == 0


def test_init_cache_batch_size_defaults_to_one():
    cache = KeyValueCache.init_cache(tiny_cfg(), "cpu")
    assert cache.batch_size == 1
    assert cache[0].past_keys.shape[0] == 1
    assert cache.previous_attention_mask.shape == (1, 0)


def test_init_cache_gqa_shape():
    cfg = tiny_cfg(n_heads=32, n_key_value_heads=8, d_head=128, d_model=64)
    cache = KeyValueCache.init_cache(cfg, "cpu", batch_size=2)
    for entry in cache.entries:
        assert entry.past_keys.shape == (2, 0, 8, 128)
        assert entry.past_values.shape == (2, 0, 8, 128)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.usefixtures("float64_default")
def test_init_cache_dtype_follows_cfg(dtype):
    cache = KeyValueCache.init_cache(tiny_cfg(dtype=dtype), "cpu", batch_size=BATCH)
    for entry in cache.entries:
        assert entry.past_keys.dtype == entry.past_values.dtype == dtype
        out_k, out_v = entry.append(*kv(2, dtype=dtype))
        assert out_k.dtype == out_v.dtype == dtype
    assert cache.previous_attention_mask.dtype == torch.int32


def test_init_cache_places_each_entry_with_get_device_for_block_index(monkeypatch):
    cfg = tiny_cfg(n_devices=3, n_layers=5)
    calls = []

    def fake(index, cfg_arg, device):
        calls.append((index, cfg_arg, device))
        return torch.device("cpu")

    monkeypatch.setattr(cache_module, "get_device_for_block_index", fake)
    cache = KeyValueCache.init_cache(cfg, "cuda:1", batch_size=BATCH)
    assert calls == [(i, cfg, "cuda:1") for i in range(5)]
    assert len(cache.entries) == 5


def test_init_cache_entries_on_the_given_device():
    for device in ("cpu", torch.device("cpu"), None):
        cache = KeyValueCache.init_cache(tiny_cfg(), device)
        assert all(e.device == torch.device("cpu") for e in cache.entries)
        assert cache.previous_attention_mask.device == torch.device("cpu")


def test_init_cache_capacity_preallocates_every_layer_and_the_mask():
    cache = KeyValueCache.init_cache(tiny_cfg(), "cpu", BATCH, capacity=20)
    assert cache.capacity == 20
    assert all(e.capacity == 20 for e in cache.entries)
    assert cache._mask.capacity >= 20


def test_aliases():
    assert HookedTransformerKeyValueCache is KeyValueCache
    assert kvlens.HookedTransformerKeyValueCache is KeyValueCache


# Constructor ------------------------------------------------------------------------------------


def test_constructor_rejects_no_entries_and_mixed_batches():
    with pytest.raises(ValueError, match="entries"):
        KeyValueCache([])
    cfg = tiny_cfg()
    entries = [
        KeyValueCacheEntry.init_cache_entry(cfg, "cpu", 2),
        KeyValueCacheEntry.init_cache_entry(cfg, "cpu", 3),
    ]
    with pytest.raises(ValueError, match=r"entries\[1\].*3.*2"):
        KeyValueCache(entries)


def test_constructor_default_mask_is_ones_over_the_entries():
    entry = KeyValueCacheEntry(*kv(5))
    cache = KeyValueCache([entry])
    assert torch.equal(cache.previous_attention_mask, torch.ones(BATCH, 5, dtype=torch.int32))
    assert cache[0] is entry


def test_constructor_copies_the_given_mask():
    mask = torch.tensor([[1, 0, 1], [0, 1, 1]])
    cache = KeyValueCache([KeyValueCacheEntry(*kv(3))], mask, frozen=True)
    assert torch.equal(cache.previous_attention_mask, mask)
    assert cache.frozen is True
    mask.zero_()
    assert cache.previous_attention_mask.sum() == 4


# Indexing, freezing -------------------------------------------------------------------------------


def test_getitem_and_iteration(cache):
    for i in range(LAYERS):
        assert cache[i] is cache.entries[i]
    assert cache[-1] is cache.entries[-1]
    assert list(cache) == cache.entries


def test_freeze_and_unfreeze_cover_every_entry(cache):
    cache.freeze()
    assert cache.frozen is True
    assert all(e.frozen for e in cache.entries)
    cache.unfreeze()
    assert cache.frozen is False
    assert not any(e.frozen for e in cache.entries)


def test_frozen_cache_entries_do_not_store(cache):
    for entry in cache.entries:
        entry.append(*kv(2))
    cache.freeze()
    for entry in cache.entries:
        out_k, _ = entry.append(*kv(3))
        assert out_k.shape[1] == 5
        assert entry.length == 2
    cache.unfreeze()
    for entry in cache.entries:
        entry.append(*kv(1))
        assert entry.length == 3
    assert cache.seq_len == 3


# Attention mask -----------------------------------------------------------------------------------


def test_append_attention_mask_returns_full_and_stores(cache):
    first = torch.tensor([[0, 1, 1], [1, 1, 1]])
    out = cache.append_attention_mask(first)
    assert torch.equal(out, first)
    second = torch.tensor([[1], [0]])
    out = cache.append_attention_mask(second)
    assert torch.equal(out, torch.cat([first, second], dim=-1))
    assert torch.equal(cache.previous_attention_mask, out)
    assert cache.previous_attention_mask.dtype == torch.int32


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool])
def test_append_attention_mask_accepts_integer_and_bool_masks(cache, dtype):
    mask = torch.tensor([[1, 0], [1, 1]]).to(dtype)
    out = cache.append_attention_mask(mask)
    assert torch.equal(out, torch.tensor([[1, 0], [1, 1]], dtype=torch.int32))


def test_append_attention_mask_lands_on_the_cache_device(cache):
    out = cache.append_attention_mask(torch.ones(BATCH, 2, dtype=torch.long))
    assert out.device == cache.device == cache[0].device
    assert cache.previous_attention_mask.device == cache.device


def test_frozen_append_attention_mask_returns_full_but_does_not_store(cache):
    prefix = torch.tensor([[1, 1], [0, 1]])
    cache.append_attention_mask(prefix)
    cache.freeze()
    new = torch.tensor([[1, 0, 1], [1, 1, 0]])
    out = cache.append_attention_mask(new)
    assert torch.equal(out, torch.cat([prefix, new], dim=-1))
    assert torch.equal(cache.previous_attention_mask, prefix)
    other = torch.tensor([[0], [0]])
    assert torch.equal(cache.append_attention_mask(other), torch.cat([prefix, other], dim=-1))
    cache.unfreeze()
    out = cache.append_attention_mask(other)
    assert torch.equal(cache.previous_attention_mask, torch.cat([prefix, other], dim=-1))


def test_attention_mask_is_a_view_and_grows_geometrically(cache):
    reallocations = 0
    ptr = cache._mask.storage.data_ptr()
    for _ in range(500):
        cache.append_attention_mask(torch.ones(BATCH, 1, dtype=torch.long))
        reallocations += cache._mask.storage.data_ptr() != ptr
        ptr = cache._mask.storage.data_ptr()
        assert cache.previous_attention_mask._base is cache._mask.storage
    assert reallocations <= 6  # 16, 32, ..., 512
    assert cache.previous_attention_mask.shape == (BATCH, 500)


def test_previous_attention_mask_setter(cache):
    for entry in cache:
        entry.append(*kv(4))
    mask = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]])
    cache.previous_attention_mask = mask
    assert torch.equal(cache.previous_attention_mask, mask)
    out = cache.append_attention_mask(torch.tensor([[1], [0]]))
    assert out.shape == (BATCH, 5)
    with pytest.raises(ValueError, match="previous_attention_mask"):
        cache.previous_attention_mask = torch.ones(3, 2, dtype=torch.long)


@pytest.mark.parametrize("length", [2, 5])
def test_previous_attention_mask_setter_refuses_another_length(cache, length):
    """On 1882f84 a shorter mask was accepted and broke the next forward pass."""
    for entry in cache:
        entry.append(*kv(4))
    before = cache.previous_attention_mask.clone()
    with pytest.raises(ValueError, match=f"covers {length} positions, the cache's layers hold 4"):
        cache.previous_attention_mask = torch.ones(BATCH, length, dtype=torch.long)
    assert torch.equal(cache.previous_attention_mask, before)


def _bad_masks() -> list:
    """(id, mask, error, words the message must contain)."""
    return [
        ("batch", torch.ones(3, 1, dtype=torch.long), ValueError,
         ["attention_mask", "batch", "3", str(BATCH)]),
        ("float", torch.ones(BATCH, 1), TypeError, ["attention_mask", "float32"]),
        ("half", torch.ones(BATCH, 1, dtype=torch.float16), TypeError,
         ["attention_mask", "float16"]),
        ("complex", torch.ones(BATCH, 1, dtype=torch.complex64), TypeError,
         ["attention_mask", "complex64"]),
        ("list", [[1], [1]], TypeError, ["attention_mask", "Tensor", "list"]),
        ("rank1", torch.ones(BATCH, dtype=torch.long), ValueError,
         ["attention_mask", "2-D", "(2,)"]),
        ("rank3", torch.ones(BATCH, 1, 1, dtype=torch.long), ValueError,
         ["attention_mask", "2-D", "(2, 1, 1)"]),
    ]  # fmt: skip


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize(
    ("mask", "error", "words"),
    [case[1:] for case in _bad_masks()],
    ids=[case[0] for case in _bad_masks()],
)
def test_bad_mask_raises_and_changes_nothing(mask, error, words, frozen):
    cache = KeyValueCache.init_cache(tiny_cfg(), "cpu", BATCH)
    cache.append_attention_mask(torch.ones(BATCH, 16, dtype=torch.long))  # storage now full
    cache.frozen = frozen
    storage, contents = cache._mask.storage, cache._mask.storage.clone()
    length = cache.previous_attention_mask.shape[1]
    with pytest.raises(error) as info:
        cache.append_attention_mask(mask)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} missing from {message!r}"
    assert cache._mask.storage is storage
    assert torch.equal(cache._mask.storage, contents)
    assert cache.previous_attention_mask.shape[1] == length
    assert cache._mask.capacity == storage.shape[1]


# Facts and reserve --------------------------------------------------------------------------------


def test_reserve_preallocates_every_layer_and_the_mask(cache):
    cache.append_attention_mask(torch.ones(BATCH, 3, dtype=torch.long))
    keys, values = kv(3)
    for entry in cache.entries:
        entry.append(keys, values)
    cache.reserve(100)
    assert cache.capacity >= 100
    assert cache._mask.capacity >= 100
    pointers = [e._keys.data_ptr() for e in cache.entries]
    for _ in range(97):
        cache.append_attention_mask(torch.ones(BATCH, 1, dtype=torch.long))
        for entry in cache.entries:
            entry.append(*kv(1))
    assert [e._keys.data_ptr() for e in cache.entries] == pointers
    assert torch.equal(cache[0].past_keys[:, :3], keys)
    assert cache.seq_len == 100


def test_nbytes(cache):
    assert cache.nbytes_used == 0
    cache.append_attention_mask(torch.ones(BATCH, 2, dtype=torch.long))
    for entry in cache.entries:
        entry.append(*kv(2))
    per_layer = 2 * BATCH * 2 * HEADS * D_HEAD * 4
    assert cache.nbytes_used == LAYERS * per_layer + BATCH * 2 * 4
    assert cache.nbytes >= cache.nbytes_used
    assert "layers=3" in repr(cache)


@pytest.mark.parametrize("batch", [1, BATCH])
@pytest.mark.parametrize("create_in_inference_mode", [False, True])
def test_cache_grown_under_inference_mode_stays_writable_outside_it(
    create_in_inference_mode, batch
):
    """As with a ``torch.cat`` cache, generating under inference mode must not lock the cache."""
    with torch.inference_mode(create_in_inference_mode):
        cache = KeyValueCache.init_cache(tiny_cfg(), "cpu", batch)
    with torch.inference_mode():
        cache.append_attention_mask(torch.ones(batch, 20, dtype=torch.long))  # grows
        for entry in cache.entries:
            entry.append(*kv(20, batch=batch))  # grows
    keys, values = kv(1, batch=batch)
    assert torch.is_grad_enabled()  # where writing an inference tensor in place is refused
    mask = cache.append_attention_mask(torch.zeros(batch, 1, dtype=torch.long))
    for entry in cache.entries:
        assert not entry._keys.is_inference()
        out_k, out_v = entry.append(keys, values)
        assert torch.equal(out_k[:, -1:], keys)
        assert torch.equal(out_v[:, -1:], values)
        assert entry.length == 21
    assert mask.shape == (batch, 21)
    assert mask[:, -1].eq(0).all()
