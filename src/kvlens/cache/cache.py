"""The whole model's key-value cache: one entry per layer plus the attention mask so far."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
from jaxtyping import Int
from torch import Tensor

from kvlens.cache.entry import EntryCheckpoint, KeyValueCacheEntry
from kvlens.cache.mask import MASK_DTYPE, MaskStorage, check_mask
from kvlens.cache.patch import Selection, plan_patch
from kvlens.config import ModelConfig
from kvlens.devices import get_device_for_block_index

__all__ = ["MASK_DTYPE", "CacheCheckpoint", "HookedTransformerKeyValueCache", "KeyValueCache"]


class CacheCheckpoint(NamedTuple):
    """A cache's state to go back to (see :meth:`KeyValueCache.checkpoint`)."""

    entries: list[EntryCheckpoint]
    mask_length: int
    tokens: int | None  # positions in the token record, None when there was none
    weights_fingerprint: str | None


class KeyValueCache:
    """Past keys and values of every layer, and the attention mask of the positions so far.

    Compatible with TransformerLens's ``HookedTransformerKeyValueCache``: ``entries``,
    ``cache[i]``, ``previous_attention_mask``, ``frozen``, ``freeze()``, ``unfreeze()`` and
    ``append_attention_mask(mask)`` keep their names and meanings. Pass it to a model as
    ``model(tokens, past_kv_cache=cache)``; each block reads and writes its own entry.

    The attention mask lives in preallocated storage too (``[batch, capacity]``, int32), so a
    decode step copies nothing but its own column.
    """

    def __init__(
        self,
        entries: list[KeyValueCacheEntry],
        previous_attention_mask: Int[Tensor, "batch pos_so_far"] | None = None,
        frozen: bool = False,
    ) -> None:
        """Wrap existing entries.

        Args:
            entries: One entry per layer, all with the same batch size.
            previous_attention_mask: The mask of the positions so far, ``[batch, pos]``; default
                all ones over the entries' committed length.
            frozen: Whether ``append_attention_mask`` leaves the stored mask unchanged. Use
                :meth:`freeze` to freeze the entries as well.
        """
        if not entries:
            raise ValueError("entries must hold at least one KeyValueCacheEntry")
        batch = entries[0].batch_size
        for i, entry in enumerate(entries):
            if entry.batch_size != batch:
                raise ValueError(
                    f"entries[{i}] has batch size {entry.batch_size}, entries[0] has {batch}"
                )
        self.entries = list(entries)
        self.frozen = frozen
        # The config of the model that filled it (set by init_cache; save() stores its
        # fingerprint) and the tokens it holds, [batch, seq_len], when known (set by prefill).
        self.cfg: ModelConfig | None = None
        # The token record is kept as chunks, joined when read: a decode step appends one
        # column without copying the record (see the `tokens` property).
        self._token_chunks: list[Tensor] | None = None
        self._token_count = 0
        # A fingerprint of the weights of the model that filled it (HookedTransformer.
        # weights_fingerprint), set by its first forward pass; another model's is refused.
        self.weights_fingerprint: str | None = None
        device = entries[0].device
        if previous_attention_mask is None:
            previous_attention_mask = torch.ones(
                (batch, entries[0].length), dtype=MASK_DTYPE, device=device
            )
        check_mask(previous_attention_mask, "previous_attention_mask", batch)
        # Writes after the committed length can be staged: see append_attention_mask(commit=False).
        self._mask = MaskStorage(previous_attention_mask, entries[0].capacity, device)

    @classmethod
    def init_cache(
        cls,
        cfg: ModelConfig,
        device: torch.device | str | None,
        batch_size: int = 1,
        capacity: int = 0,
        bounded: bool = False,
    ) -> KeyValueCache:
        """An empty cache for ``cfg``: one entry per layer, each on its block's device.

        Args:
            cfg: The model's config.
            device: The first device (see ``get_device_for_block_index``).
            batch_size: Rows of the batch.
            capacity: Positions to preallocate in every layer (e.g. prompt length plus new
                tokens, so that generation never reallocates); the storage grows past it.
            bounded: In layers with a sliding window (``cfg.layer_window``), keep only the
                positions the window can still see (see :class:`KeyValueCacheEntry`): memory
                stops growing with the context in those layers. Such a cache cannot be saved,
                shared as a prefix, or cropped to before what it dropped. Default: every
                position is kept, as TransformerLens does.
        """
        entries = [
            KeyValueCacheEntry.init_cache_entry(
                cfg,
                get_device_for_block_index(i, cfg, device),
                batch_size,
                capacity,
                bound=cfg.layer_window(i) if bounded else None,
            )
            for i in range(cfg.n_layers)
        ]
        mask = torch.empty((batch_size, 0), dtype=MASK_DTYPE, device=entries[0].device)
        cache = cls(entries, mask)
        cache.cfg = cfg
        return cache

    # TransformerLens's contract ------------------------------------------------------------------

    @property
    def previous_attention_mask(self) -> Int[Tensor, "batch pos_so_far"]:
        """The stored attention mask: a view of the storage, not a copy."""
        return self._mask.view()

    @previous_attention_mask.setter
    def previous_attention_mask(self, mask: Tensor) -> None:
        """Replace the stored mask; it must cover exactly the positions every layer holds."""
        self._mask.check(mask, "previous_attention_mask")
        pos = mask.shape[1]
        lengths = sorted({entry.length for entry in self.entries})
        if lengths != [pos]:
            held = lengths[0] if len(lengths) == 1 else f"{lengths[0]} to {lengths[-1]}"
            raise ValueError(
                f"previous_attention_mask covers {pos} positions, the cache's layers hold {held}; "
                "give a mask of that length (crop the cache to shorten it)"
            )
        self._mask.replace(mask)

    def freeze(self) -> KeyValueCache:
        """Freeze the cache and every entry: forward passes read it but do not extend it.

        Returns the cache, so that ``past_kv_cache=model.prefill(prefix).freeze()`` reads well.
        """
        self.frozen = True
        for entry in self.entries:
            entry.frozen = True
        return self

    def unfreeze(self) -> KeyValueCache:
        """Unfreeze the cache and every entry; returns the cache."""
        self.frozen = False
        for entry in self.entries:
            entry.frozen = False
        return self

    def append_attention_mask(
        self, attention_mask: Int[Tensor, "batch new_tokens"], *, commit: bool = True
    ) -> Int[Tensor, "batch pos_so_far_plus_new"]:
        """Write the new tokens' mask after the stored one and return the full mask.

        The mask is moved to the cache's device and stored as int32; the stored length advances
        unless the cache is frozen. A mask of the wrong rank or batch size raises before anything
        is written.

        Args:
            attention_mask: The new tokens' mask, ``[batch, new_tokens]``.
            commit: ``False`` writes the mask in the spare storage but leaves the stored length
                as it is until :meth:`commit_attention_mask`: a forward pass commits it only
                once every layer has run, so a pass that fails leaves the mask as it was.
        """
        self._mask.check(attention_mask, "attention_mask")
        full = self._mask.write(attention_mask)
        if commit:
            self.commit_attention_mask()
        return full

    def commit_attention_mask(self) -> None:
        """Advance the stored mask over what ``append_attention_mask(commit=False)`` wrote."""
        self._mask.commit(advance=not self.frozen)

    @property
    def tokens(self) -> Int[Tensor, "batch pos_so_far"] | None:
        """The token ids the cache holds, ``[batch, seq_len]``, or ``None`` when not known."""
        chunks = self._token_chunks
        if chunks is None:
            return None
        if len(chunks) > 1:
            chunks[:] = [torch.cat(chunks, dim=1)]
        return chunks[0]

    @tokens.setter
    def tokens(self, tokens: Int[Tensor, "batch pos_so_far"] | None) -> None:
        self._token_chunks = None if tokens is None else [tokens]
        self._token_count = 0 if tokens is None else tokens.shape[1]

    def record_tokens(self, new_tokens: Int[Tensor, "batch new_tokens"] | None) -> None:
        """Keep :attr:`tokens` true after positions were appended (unless frozen).

        ``new_tokens`` are the appended positions' token ids, or ``None`` when they are not
        known (a residual stream was fed): the record is then dropped, never left stale. A
        cache that was empty starts a record.
        """
        if self.frozen:
            return
        held = self.entries[0].length
        chunks = self._token_chunks
        if new_tokens is None:
            self.tokens = None
        elif chunks is not None:
            chunks.append(new_tokens.to(chunks[0].device))
            self._token_count += new_tokens.shape[1]
        elif held == new_tokens.shape[1]:
            self.tokens = new_tokens.to(self.device)
        if self._token_chunks is not None and self._token_count != held:
            self.tokens = None  # the record no longer matches what the layers hold

    # All-or-nothing forward passes -----------------------------------------------------------

    def checkpoint(self) -> CacheCheckpoint:
        """What :meth:`restore` needs to undo what later appends do: lengths, graphs, tokens.

        Cheap (no tensor is copied): a forward pass takes one on entry and restores it if
        anything raises, so a failed pass (a hook raising, an interrupt, a kernel error) leaves
        every layer, the mask and the token record as they were and a retry equals a clean run.
        """
        return CacheCheckpoint(
            [entry.checkpoint() for entry in self.entries],
            self._mask.length,
            None if self._token_chunks is None else self._token_count,
            self.weights_fingerprint,
        )

    def restore(self, state: CacheCheckpoint) -> None:
        """Go back to ``state`` (a :meth:`checkpoint` of this cache, with no ``select`` since)."""
        if len(state.entries) != len(self.entries):
            raise ValueError(
                f"the checkpoint has {len(state.entries)} layers, this cache {len(self.entries)}"
            )
        for entry, entry_state in zip(self.entries, state.entries, strict=True):
            entry.restore(entry_state)
        self._mask.restore(state.mask_length)
        if state.tokens is None:
            self.tokens = None
        elif self._token_chunks is not None and self._token_count >= state.tokens:
            tokens = self.tokens
            assert tokens is not None
            if self._token_count > state.tokens:
                self.tokens = tokens[:, : state.tokens]
        else:
            self.tokens = None  # the record was dropped since: unknown rather than stale
        self.weights_fingerprint = state.weights_fingerprint

    def __getitem__(self, idx: int) -> KeyValueCacheEntry:
        return self.entries[idx]

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[KeyValueCacheEntry]:
        return iter(self.entries)

    # Facts ------------------------------------------------------------------------------------

    @property
    def seq_len(self) -> int:
        """Committed positions (of the first layer; all layers agree after a forward pass)."""
        return self.entries[0].length

    @property
    def batch_size(self) -> int:
        return self.entries[0].batch_size

    @property
    def capacity(self) -> int:
        """Positions every layer holds before it must grow."""
        return min(entry.capacity for entry in self.entries)

    @property
    def device(self) -> torch.device:
        """The device of the attention mask and of the first layer."""
        return self._mask.device

    @property
    def nbytes(self) -> int:
        """Bytes held by all storage, used or not."""
        return sum(entry.nbytes for entry in self.entries) + self._mask.nbytes

    @property
    def nbytes_used(self) -> int:
        """Bytes of the committed positions."""
        used = 0
        for entry in self.entries:
            per_position = entry.batch_size * entry.n_kv_heads * entry.d_head
            held = entry.length - entry.start
            used += 2 * per_position * held * entry.dtype.itemsize
        return used + self._mask.nbytes_used

    def reserve(self, capacity: int) -> None:
        """Preallocate ``capacity`` positions in every layer and in the mask."""
        for entry in self.entries:
            entry.reserve(capacity)
        self._mask.reserve(capacity)

    def __repr__(self) -> str:
        return (
            f"KeyValueCache(layers={len(self.entries)}, batch={self.batch_size}, "
            f"seq_len={self.seq_len}, capacity={self.capacity}, frozen={self.frozen})"
        )

    # Operations ------------------------------------------------------------------------------
    # Each keeps every layer, the mask and the token record consistent and copies no more than
    # it must: crop and reset change lengths only, select and repeat_interleave copy the
    # committed positions of the selected rows, clone copies the committed positions once.

    def check_consistent(self) -> int:
        """The cache's length; raises ``ValueError`` unless every layer and the mask agree on it."""
        length = self.entries[0].length
        for i, entry in enumerate(self.entries):
            if entry.length != length:
                raise ValueError(
                    f"the cache's layer {i} holds {entry.length} positions and layer 0 holds "
                    f"{length}; its layers were extended unevenly"
                )
        if self._mask.length != length:
            raise ValueError(
                f"the cache's attention mask covers {self._mask.length} positions and its layers "
                f"hold {length}"
            )
        return length

    def clone(self) -> KeyValueCache:
        """An independent copy: same contents, capacity, mask, tokens, config and frozen flags.

        The committed positions are copied once.
        """
        self.check_consistent()
        entries = [entry.clone() for entry in self.entries]
        copy = type(self)(entries, self.previous_attention_mask, frozen=self.frozen)
        copy.cfg = self.cfg
        copy.weights_fingerprint = self.weights_fingerprint
        copy.tokens = None if self.tokens is None else self.tokens.clone()
        return copy

    def select(self, batch_indices: Tensor | Sequence[int]) -> KeyValueCache:
        """Keep rows ``batch_indices`` (reordered, repeats allowed) in place; returns the cache.

        Beam search's reorder. Copies the committed positions of the selected rows of every
        layer, the mask and the tokens; raises ``IndexError`` for an index outside
        ``[0, batch_size)`` (``TypeError``/``ValueError`` for other bad input) and leaves the
        cache unchanged.
        """
        self.check_consistent()
        indices = _check_batch_indices(batch_indices, self.batch_size)
        for entry in self.entries:
            entry.select(indices)
        self._mask.select(indices)
        if self.tokens is not None:
            self.tokens = self.tokens.index_select(0, indices.to(self.tokens.device))
        return self

    def repeat_interleave(self, repeats: int) -> KeyValueCache:
        """Repeat each row ``repeats`` times in place (rows ``0, 0, 1, 1, ...`` for 2).

        Parallel sampling's expansion; returns the cache.
        """
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
        if repeats == 1:
            return self
        return self.select(torch.arange(self.batch_size).repeat_interleave(repeats))

    def crop(self, length: int) -> KeyValueCache:
        """Keep the first ``length`` positions (negative: drop ``-length`` from the end): O(1).

        Applies to every layer, the mask and the tokens. Raises ``ValueError`` for ``length``
        outside ``[-seq_len, seq_len]``, changing nothing.
        """
        new_length = _resolve_crop_length(length, self.check_consistent())
        for entry in self.entries:
            entry.crop(new_length)
        self._mask.crop(new_length)
        if self.tokens is not None:
            self.tokens = self.tokens[:, :new_length]
        return self

    def patch_from(
        self,
        source: KeyValueCache,
        layers: Selection = None,
        heads: Selection = None,
        positions: Selection = None,
        keys: bool = True,
        values: bool = True,
    ) -> KeyValueCache:
        """Copy ``source``'s keys and/or values into this cache at the chosen layers, key/value
        heads and positions (key/value patching); returns the cache.

        ``source`` is a cache of the same model (another model's is refused by its weights'
        fingerprint) over the same number of positions or more, with this cache's batch size
        or 1 (copied into every row). ``None`` selects all layers, all key/value heads, all
        positions this cache holds. The attention mask and token record are left as they are.
        Every part of the selection is checked before anything is written: an out-of-range
        layer, head or position raises ``IndexError``, another model's cache or a mismatched
        layout ``ValueError``, and the cache is unchanged.

        Example: ``clean.patch_from(corrupted, layers=[3], heads=[1], positions=[4, 5])`` then
        ``model(next_token, past_kv_cache=clean)`` runs the clean prompt with head 1 of layer 3
        seeing the corrupted prompt's keys and values at positions 4 and 5.
        """
        if not (keys or values):
            raise ValueError("patch_from needs keys=True or values=True (or both)")
        plan = plan_patch(self, source, layers, heads, positions)
        for i in plan.layers:
            self.entries[i].patch(source[i], plan.heads, plan.positions, keys, values)
        return self

    def reset(self) -> KeyValueCache:
        """Forget every position, keeping the storage for reuse; returns the cache."""
        for entry in self.entries:
            entry.crop(0)
        self._mask.crop(0)
        self.tokens = None
        self.weights_fingerprint = None  # an empty cache may serve any model
        return self

    def save(self, path: str | os.PathLike[str], cfg: ModelConfig | None = None) -> None:
        """Write the cache to a safetensors file (see :func:`kvlens.cache.io.save_cache`)."""
        from kvlens.cache import io

        io.save_cache(self, path, cfg)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        model_or_cfg: Any,
        device: torch.device | str | None = None,
    ) -> KeyValueCache:
        """Read a cache written by :meth:`save` for this model (see ``kvlens.cache.io``)."""
        from kvlens.cache import io

        return io.load_cache(path, model_or_cfg, device)


def _resolve_crop_length(length: int, seq_len: int) -> int:
    """The length ``crop(length)`` keeps: ``length``, or ``seq_len + length`` when negative."""
    if isinstance(length, bool) or not isinstance(length, int):
        raise TypeError(f"crop length must be an int, got {type(length).__name__}")
    if length > seq_len or length < -seq_len:
        raise ValueError(
            f"cannot crop a cache of {seq_len} positions to {length}: give a length in "
            f"[-{seq_len}, {seq_len}] (a negative one drops that many positions from the end)"
        )
    return length if length >= 0 else seq_len + length


def _check_batch_indices(indices: Tensor | Sequence[int], batch: int) -> Int[Tensor, " new_batch"]:
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


# TransformerLens's name for the same thing.
HookedTransformerKeyValueCache = KeyValueCache
