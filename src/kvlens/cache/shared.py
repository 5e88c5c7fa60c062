"""One frozen prefix shared by many rows, each with its own continuation after it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeGuard

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from kvlens.cache.cache import MASK_DTYPE, KeyValueCache
from kvlens.cache.entry import KeySet, KeyValueCacheEntry


class SharedPrefixEntry:
    """One layer of a :class:`SharedPrefixCache`: the prefix's entry and the rows' suffix entry.

    Attention reads the prefix's keys and values once for all rows (see
    :mod:`kvlens.components.cascade`); new keys and values go to the suffix entry only.
    """

    def __init__(self, prefix: KeyValueCacheEntry, suffix: KeyValueCacheEntry) -> None:
        self.prefix = prefix
        self.suffix = suffix

    @property
    def prefix_keys(self) -> Float[Tensor, "1 kv_head prefix_pos d_head"]:
        """The prefix's keys in the storage layout, a view (never a copy)."""
        return self.prefix.past_keys.transpose(1, 2)

    @property
    def prefix_values(self) -> Float[Tensor, "1 kv_head prefix_pos d_head"]:
        """The prefix's values in the storage layout, a view (never a copy)."""
        return self.prefix.past_values.transpose(1, 2)

    def append(
        self,
        new_keys: Float[Tensor, "batch new_tokens kv_head d_head"],
        new_values: Float[Tensor, "batch new_tokens kv_head d_head"],
    ) -> tuple[
        Float[Tensor, "batch suffix_pos kv_head d_head"],
        Float[Tensor, "batch suffix_pos kv_head d_head"],
    ]:
        """Append to the suffix; return the suffix's keys and values so far (views)."""
        return self.suffix.append(new_keys, new_values)

    def append_for_attention(
        self,
        new_keys: Float[Tensor, "batch new_tokens kv_head d_head"],
        new_values: Float[Tensor, "batch new_tokens kv_head d_head"],
    ) -> KeySet:
        """Append to the suffix; the suffix's and the prefix's keys and values (views)."""
        own = self.suffix.append_for_attention(new_keys, new_values)
        return KeySet(own.keys, own.values, self.prefix_keys, self.prefix_values)

    def claim(self, n_new: int) -> None:
        """``None``: the keys are not in one storage (see :meth:`KeyValueCacheEntry.claim`)."""
        return None

    def commit(self, n_new: int) -> None:
        """Count ``n_new`` positions written to the suffix after a claim."""
        self.suffix.commit(n_new)

    @property
    def length(self) -> int:
        """Positions the rows' own keys cover (the suffix's)."""
        return self.suffix.length

    @property
    def batch_size(self) -> int:
        return self.suffix.batch_size

    @property
    def n_kv_heads(self) -> int:
        return self.suffix.n_kv_heads

    @property
    def d_head(self) -> int:
        return self.suffix.d_head

    @property
    def start(self) -> int:
        return self.suffix.start

    def __repr__(self) -> str:
        return f"SharedPrefixEntry(prefix={self.prefix!r}, suffix={self.suffix!r})"


class SharedPrefixCache:
    """A frozen batch-1 prefix cache shared by ``batch`` rows, plus each row's suffix cache.

    Row ``i`` sees the prefix followed by its own suffix, as if the prefix had been copied into
    it, but the prefix is stored and read once: its memory does not grow with the batch. The
    suffix's positions continue after the prefix's real (unpadded) tokens, and its attention mask
    covers the suffix only.

    Build one with :meth:`from_prefix`; ``model(tokens, past_kv_cache=shared)`` runs the rows'
    next tokens and extends the suffix. Passing a frozen batch-1 ``KeyValueCache`` with several
    rows of input builds one for that call (and ``generate`` one for the whole generation).

    The prefix must stay frozen and keep its length while it is shared.

    Attributes:
        prefix: The shared cache, batch 1, frozen.
        suffix: The rows' own cache, batch ``batch_size``.
        prefix_positions: Real (unpadded) tokens in the prefix: the first suffix position.
        prefix_mask: ``[1, 1, 1, prefix_pos]``, True at the prefix's real tokens; ``None`` when
            none is padding.
    """

    def __init__(self, prefix: KeyValueCache, suffix: KeyValueCache) -> None:
        """Pair a frozen batch-1 ``prefix`` with a ``suffix`` cache of the same layers."""
        if prefix.batch_size != 1:
            raise ValueError(
                f"a shared prefix must have batch size 1, this one has {prefix.batch_size}"
            )
        if not prefix.frozen:
            raise ValueError(
                "the prefix cache is not frozen: call prefix.freeze() before sharing it, so that "
                "no row's tokens are written into it"
            )
        if len(prefix) != len(suffix):
            raise ValueError(
                f"prefix has {len(prefix)} layers and suffix {len(suffix)}; they must match"
            )
        if any(entry.start > 0 for entry in prefix):
            raise ValueError(
                "the prefix cache is bounded and has dropped positions its continuations would "
                "see; share a prefix prefilled into an unbounded cache"
            )
        length = prefix.seq_len
        for i, (p, s) in enumerate(zip(prefix, suffix, strict=True)):
            _check_layer(i, length, p, s)
        mask = prefix.previous_attention_mask
        if mask.shape[1] != length:
            raise ValueError(
                f"the prefix's attention mask covers {mask.shape[1]} positions, its entries hold "
                f"{length}"
            )
        self.prefix = prefix
        self.suffix = suffix
        self.entries = [SharedPrefixEntry(p, s) for p, s in zip(prefix, suffix, strict=True)]
        self._prefix_length = length
        self.prefix_positions = int(mask.sum())
        self.prefix_mask: Bool[Tensor, "1 1 1 prefix_pos"] | None = (
            None if self.prefix_positions == length else mask.bool()[:, None, None, :]
        )

    @classmethod
    def from_prefix(
        cls, prefix: KeyValueCache, batch_size: int, capacity: int = 0
    ) -> SharedPrefixCache:
        """Share ``prefix`` (frozen, batch 1) by ``batch_size`` rows with empty suffixes.

        Args:
            prefix: The frozen batch-1 cache, e.g. from ``model.prefill(tokens)`` then
                ``.freeze()``.
            batch_size: Rows that continue it.
            capacity: Suffix positions to preallocate per layer; the storage grows past it.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        entries = []
        for p in prefix:
            empty = torch.empty(
                (batch_size, 0, p.n_kv_heads, p.d_head), dtype=p.dtype, device=p.device
            )
            entries.append(KeyValueCacheEntry(empty, empty, capacity=capacity))
        mask = torch.empty((batch_size, 0), dtype=MASK_DTYPE, device=prefix.device)
        return cls(prefix, KeyValueCache(entries, mask))

    def check_prefix(self) -> None:
        """Raise ``ValueError`` if the prefix was unfrozen or changed length while shared."""
        if not self.prefix.frozen or self.prefix.seq_len != self._prefix_length:
            raise ValueError(
                f"the shared prefix changed: it held {self._prefix_length} frozen positions, it "
                f"now holds {self.prefix.seq_len} (frozen={self.prefix.frozen})"
            )

    def __getitem__(self, idx: int) -> SharedPrefixEntry:
        return self.entries[idx]

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[SharedPrefixEntry]:
        return iter(self.entries)

    @property
    def batch_size(self) -> int:
        """Rows sharing the prefix."""
        return self.suffix.batch_size

    @property
    def prefix_length(self) -> int:
        """Positions in the prefix (padding included)."""
        return self._prefix_length

    @property
    def seq_len(self) -> int:
        """Positions each row attends to: the prefix's and its suffix's."""
        return self._prefix_length + self.suffix.seq_len

    @property
    def frozen(self) -> bool:
        """Whether forward passes leave the suffix unchanged."""
        return self.suffix.frozen

    def freeze(self) -> SharedPrefixCache:
        """Stop extending the suffix (the prefix is always frozen)."""
        self.suffix.freeze()
        return self

    def unfreeze(self) -> SharedPrefixCache:
        """Extend the suffix again."""
        self.suffix.unfreeze()
        return self

    def reserve(self, capacity: int) -> None:
        """Make room for ``capacity`` positions per row, the prefix's included."""
        self.suffix.reserve(max(capacity - self._prefix_length, 0))

    @property
    def nbytes(self) -> int:
        """Bytes held by the prefix's storage (once) and the suffixes'."""
        return self.prefix.nbytes + self.suffix.nbytes

    def __repr__(self) -> str:
        return (
            f"SharedPrefixCache(layers={len(self)}, batch={self.batch_size}, "
            f"prefix_length={self._prefix_length}, suffix_length={self.suffix.seq_len})"
        )


def is_shareable_prefix(cache: object) -> TypeGuard[KeyValueCache]:
    """Whether ``cache`` is a frozen batch-1 ``KeyValueCache``, which generation shares by rows."""
    return isinstance(cache, KeyValueCache) and cache.frozen and cache.batch_size == 1


def share_frozen_prefix(
    cache: KeyValueCache | SharedPrefixCache | None, batch: int
) -> KeyValueCache | SharedPrefixCache | None:
    """The cache a forward pass over ``batch`` rows should use.

    A frozen batch-1 cache given with several rows becomes the shared prefix of a new, throwaway
    :class:`SharedPrefixCache`; anything else is returned as it is.
    """
    if not isinstance(cache, KeyValueCache) or cache.batch_size == batch:
        return cache
    if cache.batch_size == 1:
        if not cache.frozen:
            raise ValueError(
                f"past_kv_cache has batch size 1 and the input {batch} rows: to share it as the "
                "prefix of every row, freeze it first (cache.freeze()); an unfrozen cache would "
                "need each row's tokens appended to it"
            )
        return SharedPrefixCache.from_prefix(cache, batch)
    raise ValueError(
        f"past_kv_cache has batch size {cache.batch_size} and the input {batch} rows; expected "
        "the same batch size, or a frozen batch-1 cache to share as a prefix"
    )


def _check_layer(i: int, length: int, p: KeyValueCacheEntry, s: KeyValueCacheEntry) -> None:
    if p.length != length:
        raise ValueError(f"prefix layer {i} holds {p.length} positions, layer 0 holds {length}")
    theirs = (s.n_kv_heads, s.d_head, s.dtype, s.device)
    ours = (p.n_kv_heads, p.d_head, p.dtype, p.device)
    if theirs != ours:
        raise ValueError(
            f"suffix layer {i} stores (kv_heads, d_head, dtype, device) = {theirs}, the prefix's "
            f"layer {i} stores {ours}"
        )
