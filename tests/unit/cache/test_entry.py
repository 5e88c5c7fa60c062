"""Tests for ``kvlens.cache.entry``: one layer's past keys and values."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor

import kvlens
from kvlens import HookedTransformerKeyValueCacheEntry, KeyValueCacheEntry, ModelConfig
from kvlens.cache.entry import MIN_CAPACITY

BATCH, HEADS, D_HEAD = 2, 3, 4


def tiny_cfg(**changes: object) -> ModelConfig:
    fields: dict[str, object] = dict(
        n_layers=2, d_model=12, n_heads=HEADS, d_head=D_HEAD, n_ctx=64, d_vocab=16
    )
    fields.update(changes)
    return ModelConfig(**fields)  # type: ignore[arg-type]


def kv(pos: int, batch: int = BATCH, heads: int = HEADS, d_head: int = D_HEAD, **kw: object):
    """Random keys and values ``[batch, pos, heads, d_head]``."""
    shape = (batch, pos, heads, d_head)
    return torch.randn(shape, **kw), torch.randn(shape, **kw)  # type: ignore[arg-type]


def storage_ptr(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


@pytest.fixture
def entry() -> KeyValueCacheEntry:
    return KeyValueCacheEntry.init_cache_entry(tiny_cfg(), "cpu", batch_size=BATCH)


@pytest.fixture
def float64_default() -> Iterator[None]:
    """Make torch's default dtype differ from every config dtype under test."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


# init_cache_entry ---------------------------------------------------------------------------------


def test_init_cache_entry_is_empty_mha():
    entry = KeyValueCacheEntry.init_cache_entry(tiny_cfg(), "cpu")
    assert entry.past_keys.shape == (1, 0, HEADS, D_HEAD)  # batch_size defaults to 1
    assert entry.past_values.shape == (1, 0, HEADS, D_HEAD)
    assert entry.frozen is False
    assert entry.length == 0


def test_init_cache_entry_gqa_shape():
    cfg = tiny_cfg(n_heads=32, n_key_value_heads=8, d_head=128, d_model=64)
    entry = KeyValueCacheEntry.init_cache_entry(cfg, "cpu", batch_size=2)
    assert entry.past_keys.shape == (2, 0, 8, 128)
    assert entry.past_values.shape == (2, 0, 8, 128)
    assert entry.n_kv_heads == 8


@pytest.mark.parametrize("kv_heads", [None, 1, 3])
def test_init_cache_entry_stores_kv_heads_when_set_else_heads(kv_heads):
    entry = KeyValueCacheEntry.init_cache_entry(tiny_cfg(n_key_value_heads=kv_heads), "cpu")
    expected = HEADS if kv_heads is None else kv_heads
    assert entry.past_keys.shape[2] == expected
    assert entry.n_kv_heads == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.usefixtures("float64_default")
def test_dtype_follows_cfg_not_torch_default(dtype):
    assert torch.get_default_dtype() == torch.float64
    entry = KeyValueCacheEntry.init_cache_entry(tiny_cfg(dtype=dtype), "cpu", batch_size=BATCH)
    assert entry.past_keys.dtype == dtype
    assert entry.past_values.dtype == dtype
    keys, values = kv(3, dtype=dtype)
    out_keys, out_values = entry.append(keys, values)
    assert out_keys.dtype == out_values.dtype == dtype
    assert entry.past_keys.dtype == entry.past_values.dtype == dtype
    assert torch.equal(entry.past_keys, keys)


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), None])
def test_init_cache_entry_device(device):
    entry = KeyValueCacheEntry.init_cache_entry(tiny_cfg(), device)
    assert entry.past_keys.device == torch.device("cpu")
    assert entry.device == torch.device("cpu")


@pytest.mark.parametrize(
    ("kwargs", "name"), [({"batch_size": 0}, "batch_size"), ({"capacity": -1}, "capacity")]
)
def test_init_cache_entry_rejects_bad_sizes(kwargs, name):
    with pytest.raises(ValueError, match=name):
        KeyValueCacheEntry.init_cache_entry(tiny_cfg(), "cpu", **kwargs)


def test_init_cache_entry_preallocates_capacity():
    entry = KeyValueCacheEntry.init_cache_entry(tiny_cfg(), "cpu", BATCH, capacity=40)
    assert entry.capacity == 40
    ptr = storage_ptr(entry._keys)
    for _ in range(40):
        entry.append(*kv(1))
    assert storage_ptr(entry._keys) == ptr
    assert entry.capacity == 40


# Constructor ------------------------------------------------------------------------------------


def test_constructor_copies_its_inputs():
    keys, values = kv(5)
    entry = KeyValueCacheEntry(keys, values)
    assert torch.equal(entry.past_keys, keys)
    assert torch.equal(entry.past_values, values)
    assert entry.length == entry.capacity == 5
    original = keys.clone()
    keys.add_(1)
    assert torch.equal(entry.past_keys, original)


def test_constructor_frozen_and_capacity():
    entry = KeyValueCacheEntry(*kv(2), frozen=True, capacity=10)
    assert entry.frozen is True
    assert entry.capacity == 10
    with pytest.raises(ValueError, match="capacity"):
        KeyValueCacheEntry(*kv(5), capacity=4)


def test_aliases():
    assert HookedTransformerKeyValueCacheEntry is KeyValueCacheEntry
    assert kvlens.HookedTransformerKeyValueCacheEntry is KeyValueCacheEntry


# append -------------------------------------------------------------------------------------------


def test_append_returns_full_and_stores(entry):
    k1, v1 = kv(3)
    out_k, out_v = entry.append(k1, v1)
    assert torch.equal(out_k, k1)
    assert torch.equal(out_v, v1)
    k2, v2 = kv(1)
    out_k, out_v = entry.append(k2, v2)
    assert torch.equal(out_k, torch.cat([k1, k2], dim=1))
    assert torch.equal(out_v, torch.cat([v1, v2], dim=1))
    assert torch.equal(entry.past_keys, out_k)
    assert torch.equal(entry.past_values, out_v)
    assert entry.past_keys.shape == (BATCH, 4, HEADS, D_HEAD)
    assert entry.length == 4


def test_append_zero_tokens(entry):
    k1, v1 = kv(2)
    entry.append(k1, v1)
    out_k, out_v = entry.append(*kv(0))
    assert torch.equal(out_k, k1)
    assert torch.equal(out_v, v1)
    assert entry.length == 2


def test_append_accepts_non_contiguous_input(entry):
    keys = torch.randn(BATCH, HEADS, 3, D_HEAD).transpose(1, 2)  # [batch, pos, head, d_head]
    values = torch.randn(D_HEAD, 3, HEADS, BATCH).permute(3, 1, 2, 0)
    assert not keys.is_contiguous()
    out_k, out_v = entry.append(keys, values)
    assert torch.equal(out_k, keys)
    assert torch.equal(out_v, values)


def test_frozen_append_returns_full_but_does_not_store(entry):
    prefix_k, prefix_v = kv(3)
    entry.append(prefix_k, prefix_v)
    entry.freeze()
    assert entry.frozen is True
    k1, v1 = kv(2)
    out_k, out_v = entry.append(k1, v1)
    assert torch.equal(out_k, torch.cat([prefix_k, k1], dim=1))
    assert torch.equal(out_v, torch.cat([prefix_v, v1], dim=1))
    assert torch.equal(entry.past_keys, prefix_k)
    assert torch.equal(entry.past_values, prefix_v)
    assert entry.length == 3
    # A second frozen append starts again after the committed prefix.
    k2, v2 = kv(1)
    out_k, out_v = entry.append(k2, v2)
    assert torch.equal(out_k, torch.cat([prefix_k, k2], dim=1))
    assert torch.equal(out_v, torch.cat([prefix_v, v2], dim=1))
    entry.unfreeze()
    assert entry.frozen is False
    k3, v3 = kv(2)
    out_k, _ = entry.append(k3, v3)
    assert torch.equal(out_k, torch.cat([prefix_k, k3], dim=1))
    assert torch.equal(entry.past_keys, out_k)
    assert entry.length == 5


def test_frozen_attribute_can_be_set_directly(entry):
    entry.frozen = True
    entry.append(*kv(2))
    assert entry.length == 0


# Storage: views, no per-token copy of the cache -------------------------------------------------


def test_past_keys_and_values_are_views_of_the_buffers(entry):
    entry.append(*kv(5))
    for view, buffer in ((entry.past_keys, entry._keys), (entry.past_values, entry._values)):
        assert view._base is buffer
        assert storage_ptr(view) == storage_ptr(buffer)
        assert view.data_ptr() == buffer.data_ptr()


@pytest.mark.parametrize("frozen", [False, True])
def test_append_returns_views_of_the_buffers(entry, frozen):
    entry.append(*kv(2))
    entry.frozen = frozen
    out_k, out_v = entry.append(*kv(3))
    assert out_k._base is entry._keys
    assert out_v._base is entry._values
    assert storage_ptr(out_k) == storage_ptr(entry._keys)
    assert storage_ptr(out_v) == storage_ptr(entry._values)


def test_buffers_are_laid_out_head_major(entry):
    keys, values = kv(3)
    entry.append(keys, values)
    assert entry._keys.shape == (BATCH, HEADS, entry.capacity, D_HEAD)
    assert entry._keys.is_contiguous()
    assert torch.equal(entry._keys[:, :, :3], keys.transpose(1, 2))
    assert torch.equal(entry._values[:, :, :3], values.transpose(1, 2))


def test_growth_is_geometric():
    entry = KeyValueCacheEntry.init_cache_entry(tiny_cfg(), "cpu", batch_size=1)
    n = 1000
    reallocations = 0
    ptr = storage_ptr(entry._keys)
    for _ in range(n):
        entry.append(*kv(1, batch=1))
        new_ptr = storage_ptr(entry._keys)
        reallocations += new_ptr != ptr
        ptr = new_ptr
    # Doubling from MIN_CAPACITY: 16, 32, ..., 1024.
    assert reallocations == math.ceil(math.log2(n / MIN_CAPACITY)) + 1
    assert n <= entry.capacity < 2 * n
    assert entry.length == n


def test_appends_within_capacity_do_not_move_the_committed_data(entry):
    entry.reserve(50)
    keys_ptr, values_ptr = storage_ptr(entry._keys), storage_ptr(entry._values)
    for _ in range(50):
        entry.append(*kv(1))
        assert storage_ptr(entry.past_keys) == keys_ptr
        assert storage_ptr(entry.past_values) == values_ptr


def test_frozen_append_writes_after_committed_length_without_advancing(entry):
    entry.reserve(16)
    keys, values = kv(4)
    entry.append(keys, values)
    entry.freeze()
    new_k, new_v = kv(2)
    entry.append(new_k, new_v)
    assert entry.length == 4
    assert torch.equal(entry._keys[:, :, 4:6], new_k.transpose(1, 2))
    assert torch.equal(entry._values[:, :, 4:6], new_v.transpose(1, 2))
    assert torch.equal(entry._keys[:, :, :4], keys.transpose(1, 2))


def test_growth_keeps_contents():
    entry = KeyValueCacheEntry.init_cache_entry(tiny_cfg(), "cpu", BATCH)
    keys, values = kv(MIN_CAPACITY)
    entry.append(keys, values)
    assert entry.capacity == MIN_CAPACITY
    more_k, more_v = kv(3)
    entry.append(more_k, more_v)
    assert entry.capacity == 2 * MIN_CAPACITY
    assert torch.equal(entry.past_keys, torch.cat([keys, more_k], dim=1))
    assert torch.equal(entry.past_values, torch.cat([values, more_v], dim=1))


def test_large_append_grows_to_fit():
    entry = KeyValueCacheEntry.init_cache_entry(tiny_cfg(), "cpu", BATCH)
    keys, values = kv(100)
    out_k, _ = entry.append(keys, values)
    assert entry.capacity >= 100
    assert torch.equal(out_k, keys)


def test_reserve_keeps_contents_and_never_shrinks(entry):
    keys, values = kv(3)
    entry.append(keys, values)
    entry.reserve(100)
    assert entry.capacity >= 100
    assert torch.equal(entry.past_keys, keys)
    assert torch.equal(entry.past_values, values)
    capacity = entry.capacity
    entry.reserve(5)
    assert entry.capacity == capacity


# Assigning past_keys / past_values ---------------------------------------------------------------


def test_assigning_past_keys_writes_into_storage(entry):
    entry.append(*kv(3))
    new_keys, new_values = kv(3)
    entry.past_keys = new_keys
    entry.past_values = new_values
    assert torch.equal(entry.past_keys, new_keys)
    assert torch.equal(entry.past_values, new_values)
    assert entry.past_keys._base is entry._keys


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (torch.zeros(BATCH, 2, HEADS, D_HEAD), ValueError),  # a different length
        (torch.zeros(BATCH, 3, HEADS, D_HEAD, dtype=torch.float16), TypeError),
        ([[0.0]], TypeError),
    ],
)
def test_assigning_past_keys_rejects_bad_values(entry, value, error):
    entry.append(*kv(3))
    before = entry.past_keys.clone()
    with pytest.raises(error, match="past_keys"):
        entry.past_keys = value
    assert torch.equal(entry.past_keys, before)


# Bad input ----------------------------------------------------------------------------------------


def _bad_appends() -> list:
    """(id, new_keys, new_values, error, words the message must contain)."""
    good = torch.zeros(BATCH, 1, HEADS, D_HEAD)
    return [
        ("batch", torch.zeros(3, 1, HEADS, D_HEAD), torch.zeros(3, 1, HEADS, D_HEAD),
         ValueError, ["new_keys", "batch", "3", str(BATCH)]),
        ("heads", torch.zeros(BATCH, 1, 5, D_HEAD), torch.zeros(BATCH, 1, 5, D_HEAD),
         ValueError, ["new_keys", "heads", "5", str(HEADS)]),
        ("d_head", torch.zeros(BATCH, 1, HEADS, 7), torch.zeros(BATCH, 1, HEADS, 7),
         ValueError, ["new_keys", "d_head", "7", str(D_HEAD)]),
        ("pair_shape", good, torch.zeros(BATCH, 2, HEADS, D_HEAD),
         ValueError, ["new_keys", "new_values", "(2, 1, 3, 4)", "(2, 2, 3, 4)"]),
        ("dtype", good.half(), good.half(),
         TypeError, ["new_keys", "float16", "float32"]),
        ("pair_dtype", good, good.double(),
         TypeError, ["new_keys", "new_values", "float32", "float64"]),
        ("int_keys", good.long(), good.long(),
         TypeError, ["new_keys", "int64"]),
        ("keys_list", good.tolist(), good,
         TypeError, ["new_keys", "Tensor", "list"]),
        ("values_none", good, None,
         TypeError, ["new_values", "Tensor", "NoneType"]),
        ("rank3", torch.zeros(BATCH, HEADS, D_HEAD), torch.zeros(BATCH, HEADS, D_HEAD),
         ValueError, ["new_keys", "4-D", "(2, 3, 4)"]),
        ("rank5", good[None], good[None],
         ValueError, ["new_keys", "4-D", "(1, 2, 1, 3, 4)"]),
        ("values_rank3", good, good[:, 0],
         ValueError, ["new_values", "4-D", "(2, 3, 4)"]),
    ]  # fmt: skip


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize(
    ("new_keys", "new_values", "error", "words"),
    [case[1:] for case in _bad_appends()],
    ids=[case[0] for case in _bad_appends()],
)
def test_bad_append_raises_and_changes_nothing(new_keys, new_values, error, words, frozen):
    # Full to capacity, so that a good append would have to grow: the check must come first.
    entry = KeyValueCacheEntry(*kv(5), frozen=frozen)
    assert entry.length == entry.capacity == 5
    before = (entry._keys.clone(), entry._values.clone(), entry._keys, entry._values)
    with pytest.raises(error) as info:
        entry.append(new_keys, new_values)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} missing from {message!r}"
    assert torch.equal(entry._keys, before[0])
    assert torch.equal(entry._values, before[1])
    assert entry._keys is before[2] and entry._values is before[3]
    assert entry.length == 5
    assert entry.capacity == 5
    assert entry.frozen is frozen


def test_repr_and_nbytes(entry):
    entry.append(*kv(3))
    text = repr(entry)
    assert "length=3" in text and f"batch={BATCH}" in text
    assert entry.nbytes == 2 * BATCH * HEADS * entry.capacity * D_HEAD * 4


# Autograd ---------------------------------------------------------------------------------------


def test_tracked_append_returns_graph_and_stores_detached_values(entry):
    keys, values = kv(3, requires_grad=True)
    full_k, full_v = entry.append(keys, values)
    assert full_k.grad_fn is not None and entry.tracks_graph
    assert entry.past_keys is full_k
    assert not entry._keys.requires_grad  # the storage never joins the graph
    torch.testing.assert_close(entry._keys[:, :, :3].transpose(1, 2), keys.detach())
    more_k, more_v = kv(2, requires_grad=True)
    full_k, full_v = entry.append(more_k, more_v)
    (full_k.sum() + 2 * full_v.sum()).backward()
    for t, g in ((keys, 1.0), (values, 2.0), (more_k, 1.0), (more_v, 2.0)):
        torch.testing.assert_close(t.grad, torch.full_like(t, g))


def test_tracked_append_on_a_frozen_entry_keeps_no_graph(entry):
    with torch.no_grad():
        entry.append(*kv(2))
    entry.freeze()
    for _ in range(3):  # each continuation backpropagates on its own
        keys, values = kv(1, requires_grad=True)
        full_k, _ = entry.append(keys, values)
        full_k.sum().backward()
        assert keys.grad is not None and entry.length == 2 and not entry.tracks_graph


def test_untracked_commit_drops_the_graph(entry):
    entry.append(*kv(2, requires_grad=True))
    assert entry.tracks_graph
    with torch.no_grad():
        entry.append(*kv(1))
    assert not entry.tracks_graph and entry.past_keys.shape[1] == 3
    entry.append(*kv(1, requires_grad=True))
    entry.claim(1)
    entry.commit(1)
    assert not entry.tracks_graph and entry.length == 5


def test_crop_and_select_carry_the_graph(entry):
    keys, values = kv(4, requires_grad=True)
    entry.append(keys, values)
    entry.crop(3)
    assert entry.past_keys.shape[1] == 3
    entry.select(torch.tensor([1, 1, 0]))
    assert entry.batch_size == 3 and entry.past_keys.shape == (3, 3, HEADS, D_HEAD)
    entry.past_keys.sum().backward()
    want = torch.zeros_like(keys)
    want[1, :3], want[0, :3] = 2.0, 1.0
    torch.testing.assert_close(keys.grad, want)
    with pytest.raises(ValueError, match=r"crop length must be in \[0, 3\]"):
        entry.crop(4)


def test_constructor_and_setter_keep_a_tracked_tensor(entry):
    keys, values = kv(2, requires_grad=True)
    built = KeyValueCacheEntry(keys * 2, values * 2)
    assert built.tracks_graph and built.past_keys.grad_fn is not None
    built.past_keys.sum().backward()
    torch.testing.assert_close(keys.grad, torch.full_like(keys, 2.0))
    with torch.no_grad():
        plain = KeyValueCacheEntry(keys * 2, values * 2)
    assert not plain.tracks_graph


def test_append_refuses_another_device_naming_both(entry):
    keys, values = kv(1, device="meta")
    with pytest.raises(ValueError, match=r"new_keys is on meta.*this cache entry is on cpu"):
        entry.append(keys, values)
    assert entry.length == 0
