"""The whole model's key-value cache: one entry per layer plus the attention mask so far."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
from jaxtyping import Int
from torch import Tensor

from kvlens.cache.entry import EntryCheckpoint, KeyValueCacheEntry, _grown_capacity
from kvlens.config import ModelConfig
from kvlens.devices import get_device_for_block_index

MASK_DTYPE = torch.int


class CacheCheckpoint(NamedTuple):
    """A cache's state to go back to (see :meth:`KeyValueCache.checkpoint`)."""

    entries: list[EntryCheckpoint]
    mask_length: int
    tokens: Tensor | None
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
        self.tokens: Int[Tensor, "batch pos_so_far"] | None = None
        # A fingerprint of the weights of the model that filled it (HookedTransformer.
        # weights_fingerprint), set by its first forward pass; another model's is refused.
        self.weights_fingerprint: str | None = None
        device = entries[0].device
        if previous_attention_mask is None:
            previous_attention_mask = torch.ones(
                (batch, entries[0].length), dtype=MASK_DTYPE, device=device
            )
        self._check_mask(previous_attention_mask, "previous_attention_mask")
        pos = previous_attention_mask.shape[1]
        capacity = max(pos, entries[0].capacity)
        self._mask = _new_mask_storage(previous_attention_mask, capacity, device)
        self._mask_length = pos
        self._staged_mask_length: int | None = None  # see append_attention_mask(commit=False)

    @classmethod
    def init_cache(
        cls,
        cfg: ModelConfig,
        device: torch.device | str | None,
        batch_size: int = 1,
        capacity: int = 0,
    ) -> KeyValueCache:
        """An empty cache for ``cfg``: one entry per layer, each on its block's device.

        Args:
            cfg: The model's config.
            device: The first device (see ``get_device_for_block_index``).
            batch_size: Rows of the batch.
            capacity: Positions to preallocate in every layer (e.g. prompt length plus new
                tokens, so that generation never reallocates); the storage grows past it.
        """
        entries = [
            KeyValueCacheEntry.init_cache_entry(
                cfg, get_device_for_block_index(i, cfg, device), batch_size, capacity
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
        return self._mask.narrow(1, 0, self._mask_length)

    @previous_attention_mask.setter
    def previous_attention_mask(self, mask: Tensor) -> None:
        """Replace the stored mask; it must cover exactly the positions every layer holds."""
        self._check_mask(mask, "previous_attention_mask")
        pos = mask.shape[1]
        lengths = sorted({entry.length for entry in self.entries})
        if lengths != [pos]:
            held = lengths[0] if len(lengths) == 1 else f"{lengths[0]} to {lengths[-1]}"
            raise ValueError(
                f"previous_attention_mask covers {pos} positions, the cache's layers hold {held}; "
                "give a mask of that length (crop the cache to shorten it)"
            )
        self._reserve_mask(pos)
        self._mask[:, :pos].copy_(mask)
        self._mask_length = pos

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
        self._check_mask(attention_mask, "attention_mask")
        start = self._mask_length
        end = start + attention_mask.shape[1]
        if end > self._mask.shape[1]:
            self._reserve_mask(end)
        self._mask.narrow(1, start, end - start).copy_(attention_mask)
        if commit:
            self._staged_mask_length = None
            if not self.frozen:
                self._mask_length = end
        else:
            self._staged_mask_length = end
        return self._mask.narrow(1, 0, end)

    def commit_attention_mask(self) -> None:
        """Advance the stored mask over what ``append_attention_mask(commit=False)`` wrote."""
        if self._staged_mask_length is not None and not self.frozen:
            self._mask_length = self._staged_mask_length
        self._staged_mask_length = None

    def record_tokens(self, new_tokens: Int[Tensor, "batch new_tokens"] | None) -> None:
        """Keep :attr:`tokens` true after positions were appended (unless frozen).

        ``new_tokens`` are the appended positions' token ids, or ``None`` when they are not
        known (a residual stream was fed): the record is then dropped, never left stale. A
        cache that was empty starts a record.
        """
        if self.frozen:
            return
        held = self.entries[0].length
        if new_tokens is None:
            self.tokens = None
        elif self.tokens is not None:
            self.tokens = torch.cat((self.tokens, new_tokens.to(self.tokens.device)), dim=1)
        elif held == new_tokens.shape[1]:
            self.tokens = new_tokens.to(self.device)
        if self.tokens is not None and self.tokens.shape[1] != held:
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
            self._mask_length,
            self.tokens,
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
        self._mask_length = state.mask_length
        self._staged_mask_length = None
        self.tokens = state.tokens
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
            used += 2 * per_position * entry.length * entry._keys.element_size()
        return used + self.batch_size * self._mask_length * self._mask.element_size()

    def reserve(self, capacity: int) -> None:
        """Preallocate ``capacity`` positions in every layer and in the mask."""
        for entry in self.entries:
            entry.reserve(capacity)
        self._reserve_mask(capacity)

    def __repr__(self) -> str:
        return (
            f"KeyValueCache(layers={len(self.entries)}, batch={self.batch_size}, "
            f"seq_len={self.seq_len}, capacity={self.capacity}, frozen={self.frozen})"
        )

    # Operations (see kvlens.cache.ops and kvlens.cache.io) ------------------------------------

    def clone(self) -> KeyValueCache:
        """An independent copy (committed positions copied once, same capacity)."""
        from kvlens.cache import ops

        return ops.clone(self)

    def select(self, batch_indices: Tensor | Sequence[int]) -> KeyValueCache:
        """Keep rows ``batch_indices`` (reordered, repeats allowed) in place; returns the cache.

        Beam search's reorder. Copies the committed positions of the selected rows; raises
        ``IndexError`` for an index outside ``[0, batch_size)`` and leaves the cache unchanged.
        """
        from kvlens.cache import ops

        ops.select(self, batch_indices)
        return self

    def repeat_interleave(self, repeats: int) -> KeyValueCache:
        """Repeat each row ``repeats`` times in place (parallel sampling); returns the cache."""
        from kvlens.cache import ops

        ops.repeat_interleave(self, repeats)
        return self

    def crop(self, length: int) -> KeyValueCache:
        """Keep the first ``length`` positions (negative: drop ``-length`` from the end): O(1).

        Raises ``ValueError`` for ``length`` outside ``[-seq_len, seq_len]``, changing nothing.
        """
        from kvlens.cache import ops

        ops.crop(self, length)
        return self

    def reset(self) -> KeyValueCache:
        """Forget every position, keeping the storage; returns the cache."""
        from kvlens.cache import ops

        ops.reset(self)
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

    # Internals --------------------------------------------------------------------------------

    def _reserve_mask(self, capacity: int) -> None:
        if capacity <= self._mask.shape[1]:
            return
        grown = _grown_capacity(self._mask.shape[1], capacity)
        self._mask = _new_mask_storage(self.previous_attention_mask, grown, self._mask.device)

    def _check_mask(self, mask: Tensor, name: str) -> None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
        if mask.ndim != 2:
            raise ValueError(f"{name} must be 2-D [batch, pos], got shape {tuple(mask.shape)}")
        if mask.is_floating_point() or mask.is_complex():
            raise TypeError(f"{name} must hold integers or booleans, got {mask.dtype}")
        if mask.shape[0] != self.batch_size:
            raise ValueError(
                f"{name} has batch size {mask.shape[0]}, this cache stores {self.batch_size}"
            )


def _new_mask_storage(
    contents: Int[Tensor, "batch pos"], capacity: int, device: torch.device
) -> Int[Tensor, "batch capacity"]:
    """``[batch, capacity]`` int32 storage on ``device`` holding ``contents`` first, zeros after.

    A normal tensor even under ``torch.inference_mode``, like the entries' buffers, so that it can
    still be written in place outside it.
    """
    batch, pos = contents.shape
    with torch.inference_mode(False):
        storage = torch.zeros((batch, capacity), dtype=MASK_DTYPE, device=device)
        storage[:, :pos].copy_(contents)
    return storage


# TransformerLens's name for the same thing.
HookedTransformerKeyValueCache = KeyValueCache
