"""Operations on a whole cache: clone, select rows, repeat rows, crop, reset.

Each keeps every layer and the attention mask (and the token record, when the cache has one)
consistent, and copies no more than it must: ``crop`` and ``reset`` change lengths only, ``select``
and ``repeat_interleave`` copy the committed positions of the selected rows, ``clone`` copies the
committed positions once. The cache's methods (:meth:`KeyValueCache.crop` and the others) call
these.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from jaxtyping import Int
from torch import Tensor

from kvlens.cache.entry import KeyValueCacheEntry

if TYPE_CHECKING:
    from kvlens.cache.cache import KeyValueCache


def check_consistent(cache: KeyValueCache) -> int:
    """The cache's length; raises ``ValueError`` unless every layer and the mask agree on it."""
    length = cache.entries[0].length
    for i, entry in enumerate(cache.entries):
        if entry.length != length:
            raise ValueError(
                f"the cache's layer {i} holds {entry.length} positions and layer 0 holds "
                f"{length}; its layers were extended unevenly"
            )
    if cache._mask_length != length:
        raise ValueError(
            f"the cache's attention mask covers {cache._mask_length} positions and its layers "
            f"hold {length}"
        )
    return length


# Lengths only -----------------------------------------------------------------------------------


def resolve_crop_length(length: int, seq_len: int) -> int:
    """The length ``crop(length)`` keeps: ``length``, or ``seq_len + length`` when negative."""
    if isinstance(length, bool) or not isinstance(length, int):
        raise TypeError(f"crop length must be an int, got {type(length).__name__}")
    if length > seq_len or length < -seq_len:
        raise ValueError(
            f"cannot crop a cache of {seq_len} positions to {length}: give a length in "
            f"[-{seq_len}, {seq_len}] (a negative one drops that many positions from the end)"
        )
    return length if length >= 0 else seq_len + length


def crop(cache: KeyValueCache, length: int) -> None:
    """Keep the first ``length`` positions of every layer, the mask and the tokens: O(1).

    A negative ``length`` drops that many positions from the end (rolling back). Invalid input
    raises before anything changes.
    """
    new_length = resolve_crop_length(length, check_consistent(cache))
    for entry in cache.entries:
        entry.crop(new_length)
    cache._mask_length = new_length
    if cache.tokens is not None:
        cache.tokens = cache.tokens[:, :new_length]


def reset(cache: KeyValueCache) -> None:
    """Forget every position (lengths to 0), keeping the storage for reuse."""
    for entry in cache.entries:
        entry.crop(0)
    cache._mask_length = 0
    cache.tokens = None
    cache.weights_fingerprint = None  # an empty cache may serve any model


# Copies -----------------------------------------------------------------------------------------


def clone_entry(entry: KeyValueCacheEntry) -> KeyValueCacheEntry:
    """An independent entry with the same contents, capacity and frozen flag."""
    return KeyValueCacheEntry(
        entry.past_keys, entry.past_values, frozen=entry.frozen, capacity=entry.capacity
    )


def clone(cache: KeyValueCache) -> KeyValueCache:
    """An independent copy: same contents, capacity, mask, tokens, config and frozen flags."""
    check_consistent(cache)
    entries = [clone_entry(entry) for entry in cache.entries]
    copy = type(cache)(entries, cache.previous_attention_mask, frozen=cache.frozen)
    copy.cfg = cache.cfg
    copy.weights_fingerprint = cache.weights_fingerprint
    copy.tokens = None if cache.tokens is None else cache.tokens.clone()
    return copy


def check_batch_indices(indices: Tensor | Sequence[int], batch: int) -> Int[Tensor, " new_batch"]:
    """``indices`` as a 1-D int64 tensor, each in ``[0, batch)``; raises otherwise."""
    if not isinstance(indices, Tensor):
        indices = torch.as_tensor(list(indices), dtype=torch.long)
    if indices.ndim != 1:
        raise ValueError(f"batch_indices must be 1-D, got shape {tuple(indices.shape)}")
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise TypeError(f"batch_indices must hold integers, got {indices.dtype}")
    if indices.numel() == 0:
        raise ValueError("batch_indices is empty: a cache needs at least one row")
    low, high = int(indices.min()), int(indices.max())
    if low < 0 or high >= batch:
        bad = low if low < 0 else high
        raise IndexError(
            f"batch_indices holds {bad}, but this cache has {batch} rows (valid: 0 to {batch - 1})"
        )
    return indices.to(torch.long)


def select(cache: KeyValueCache, batch_indices: Tensor | Sequence[int]) -> None:
    """Keep rows ``batch_indices`` of every layer, the mask and the tokens, in that order.

    Invalid indices raise ``IndexError`` (or ``TypeError``/``ValueError``) before anything changes.
    """
    check_consistent(cache)
    batch = cache.batch_size
    indices = check_batch_indices(batch_indices, batch)
    mask = cache.previous_attention_mask.index_select(0, indices.to(cache.device))
    for entry in cache.entries:
        entry.select(indices)
    if indices.numel() == batch:
        cache._mask[:, : cache._mask_length].copy_(mask)
    else:
        capacity = cache._mask.shape[1]
        with torch.inference_mode(False):
            storage = torch.zeros((mask.shape[0], capacity), dtype=mask.dtype, device=mask.device)
            storage[:, : mask.shape[1]].copy_(mask)
        cache._mask = storage
    if cache.tokens is not None:
        cache.tokens = cache.tokens.index_select(0, indices.to(cache.tokens.device))


def repeat_interleave(cache: KeyValueCache, repeats: int) -> None:
    """Repeat each row ``repeats`` times in place (rows ``0, 0, 1, 1, ...`` for 2)."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    if repeats == 1:
        return
    indices = torch.arange(cache.batch_size).repeat_interleave(repeats)
    select(cache, indices)
