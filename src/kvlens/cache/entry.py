"""One layer's past keys and values, in preallocated storage written in place."""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
from jaxtyping import Float, Int
from torch import Tensor

from kvlens.config import ModelConfig

# Smallest capacity a buffer grows to; avoids a run of tiny reallocations during the first steps.
MIN_CAPACITY = 16
# Positions a bounded entry holds beyond its window, so that it drops old positions once every
# BOUNDED_SLACK decode steps rather than every step.
BOUNDED_SLACK = 64


def _grown_capacity(capacity: int, needed: int) -> int:
    """Geometric growth: at least double, so that appending n tokens costs O(n) amortized."""
    return max(needed, 2 * capacity, MIN_CAPACITY)


class KeySet(NamedTuple):
    """The keys and values a layer's new queries attend to, as a cache entry gives them.

    Every cache entry (:class:`KeyValueCacheEntry`, and the shared-prefix entry) returns one from
    ``append_for_attention``, so attention reads them without knowing the entry's kind. Laid out
    ``[batch, kv_head, pos, d_head]`` (views of the storage, never copies).

    Attributes:
        keys: The rows' own keys, cached then new.
        values: Their values.
        prefix_keys: ``[1, kv_head, prefix_pos, d_head]``: keys of one prefix every row
            continues, before the rows' own; ``None`` when there is none.
        prefix_values: Their values.
        start: Own keys before this one were dropped (a bounded entry): ``keys[:, :, 0]`` is
            the rows' own position ``start``.
    """

    keys: Float[Tensor, "batch kv_head pos d_head"]
    values: Float[Tensor, "batch kv_head pos d_head"]
    prefix_keys: Float[Tensor, "1 kv_head prefix_pos d_head"] | None = None
    prefix_values: Float[Tensor, "1 kv_head prefix_pos d_head"] | None = None
    start: int = 0


class AttentionEntry(Protocol):
    """What a layer needs of its cache entry; both kinds of entry implement it.

    :class:`KeyValueCacheEntry` (the rows' own keys) and
    :class:`~kvlens.cache.shared.SharedPrefixEntry` (a shared prefix, then the rows' own).
    """

    @property
    def length(self) -> int: ...

    @property
    def batch_size(self) -> int: ...

    @property
    def n_kv_heads(self) -> int: ...

    @property
    def d_head(self) -> int: ...

    @property
    def start(self) -> int: ...

    def append_for_attention(self, new_keys: Tensor, new_values: Tensor) -> KeySet: ...

    def claim(self, n_new: int) -> tuple[Tensor, Tensor, int] | None: ...

    def commit(self, n_new: int) -> None: ...


class EntryCheckpoint(NamedTuple):
    """An entry's state to go back to (see :meth:`KeyValueCacheEntry.checkpoint`)."""

    length: int
    graph_keys: Tensor | None
    graph_values: Tensor | None


class KeyValueCacheEntry:
    """Past keys and values of one attention layer.

    Storage is a pair of preallocated buffers laid out ``[batch, kv_head, capacity, d_head]``
    (each head's keys contiguous over positions, the layout attention reads) and a committed length
    kept as a Python int. ``past_keys`` and ``past_values`` are views of the first ``length``
    positions, shaped ``[batch, pos_so_far, kv_head, d_head]`` as in TransformerLens. Appending
    writes the new positions in place; when the buffers are full they are replaced by ones of
    at least twice the capacity, so the cost per appended token is amortized O(1).

    A frozen entry still accepts appends: the new positions are written after the committed length
    and returned as part of the full keys and values, but the length does not advance, so the next
    append overwrites them. Views returned by :meth:`append` are valid until the next append.

    Autograd: when gradients are being tracked (grad mode on and the new keys or values require
    grad, or the entry already holds a graph), :meth:`append` returns new tensors,
    ``cat(past, new)``, through which gradients reach the new and the earlier keys and values, and
    a committing append keeps them as the entry's graph (``past_keys`` then returns it), as
    TransformerLens's ``torch.cat`` cache does. The storage still receives every value, detached,
    so nothing in place ever touches a tensor autograd saved. A frozen entry keeps no graph of the
    positions appended after it, so a prefix prefilled without grad can be backpropagated through
    by any number of continuations. An append that commits positions without tracking (under
    ``torch.no_grad``) drops the graph, as a ``torch.cat`` made without grad would.

    Bounded (``bound=w``, opt-in, for a sliding-window layer of window ``w``): the entry keeps only
    the positions a later query can still see. When its storage is full it drops the positions
    before the last ``w - 1`` committed ones, so it never holds more than ``w - 1`` plus the
    positions of one pass plus a little slack (``BOUNDED_SLACK``). ``length`` still counts every
    position appended (layers and mask agree on it); ``start`` is the cache index of the first
    position still held, and ``past_keys``/``past_values`` hold positions ``start .. length``
    only, ``[batch, length - start, kv_head, d_head]``.
    """

    def __init__(
        self,
        past_keys: Float[Tensor, "batch pos kv_head d_head"],
        past_values: Float[Tensor, "batch pos kv_head d_head"],
        frozen: bool = False,
        *,
        capacity: int | None = None,
        bound: int | None = None,
        start: int = 0,
    ) -> None:
        """Build an entry holding copies of ``past_keys`` and ``past_values``.

        Args:
            past_keys: Keys so far, ``[batch, pos, kv_head, d_head]``.
            past_values: Values so far, same shape, dtype and device as ``past_keys``.
            frozen: Whether appends leave the committed length unchanged.
            capacity: Positions to preallocate (at least ``pos``); default ``pos``.
            bound: Keep only what a sliding window of this many keys can still see (see the
                class docstring); ``None`` keeps every position.
            start: The cache index of ``past_keys[:, 0]`` (a bounded entry's held positions).
        """
        if bound is not None and (
            isinstance(bound, bool) or not isinstance(bound, int) or bound < 1
        ):
            raise ValueError(f"bound must be a positive int or None, got {bound!r}")
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"start must be an int >= 0, got {start!r}")
        if start and bound is None:
            raise ValueError("start > 0 needs a bound: only a bounded entry drops positions")
        self.bound = bound
        self._start = start
        _check_pair(past_keys, past_values)
        batch, pos, heads, d_head = past_keys.shape
        capacity = pos if capacity is None else capacity
        if capacity < pos:
            raise ValueError(f"capacity must be >= the {pos} positions given, got {capacity}")
        # Shape facts as plain ints: every append checks them, and at batch 1 the Python work
        # around the write, not the write itself, is the cost of an append.
        self._batch, self._heads, self._d_head = batch, heads, d_head
        self._dtype = past_keys.dtype
        self._device = past_keys.device
        self._length = start + pos
        self._set_storage(
            _new_storage(past_keys, self._batch, self._heads, capacity, self._d_head, pos),
            _new_storage(past_values, self._batch, self._heads, capacity, self._d_head, pos),
        )
        # The committed keys and values as tensors autograd tracks, [batch, pos, kv_head, d_head],
        # or None where the storage alone holds them (see the class docstring).
        self._graph_keys: Tensor | None = _tracked(past_keys)
        self._graph_values: Tensor | None = _tracked(past_values)
        self.frozen = frozen

    def _set_storage(self, keys: Tensor, values: Tensor) -> None:
        """Install new buffers and the position-major views every read and write goes through."""
        self._keys, self._values = keys, values
        # [batch, capacity, kv_head, d_head] views of the same memory: TransformerLens's layout,
        # built once here rather than with a transpose per read and per write.
        self._keys_by_pos = keys.transpose(1, 2)
        self._values_by_pos = values.transpose(1, 2)
        self._capacity = keys.shape[2]

    @classmethod
    def init_cache_entry(
        cls,
        cfg: ModelConfig,
        device: torch.device | str | None,
        batch_size: int = 1,
        capacity: int = 0,
        bound: int | None = None,
    ) -> KeyValueCacheEntry:
        """An empty entry for a layer of ``cfg``.

        Stores ``cfg.n_key_value_heads`` heads when set (grouped-query attention), else
        ``cfg.n_heads``, in ``cfg.dtype`` whatever torch's default dtype is.

        Args:
            cfg: The model's config.
            device: Where the buffers live.
            batch_size: Rows of the batch.
            capacity: Positions to preallocate; the buffers grow past it when needed.
            bound: Keep only a sliding window of this many keys (see the class docstring).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        if bound is not None:
            capacity = min(capacity, bound - 1 + BOUNDED_SLACK)
        shape = (batch_size, 0, cfg.n_kv_heads, cfg.d_head)
        empty = torch.empty(shape, dtype=cfg.dtype, device=device)
        return cls(empty, empty, capacity=capacity, bound=bound)

    # Views ------------------------------------------------------------------------------------

    @property
    def past_keys(self) -> Float[Tensor, "batch pos_so_far kv_head d_head"]:
        """The committed keys: a view of the storage, not a copy (the graph, when one is kept)."""
        if self._graph_keys is not None:
            return self._graph_keys
        return self._keys_by_pos.narrow(1, 0, self._length - self._start)

    @past_keys.setter
    def past_keys(self, keys: Tensor) -> None:
        self._overwrite(self._keys, keys, "past_keys")
        self._graph_keys = _tracked(keys)

    @property
    def past_values(self) -> Float[Tensor, "batch pos_so_far kv_head d_head"]:
        """The committed values: a view of the storage, not a copy (the graph, when one is kept)."""
        if self._graph_values is not None:
            return self._graph_values
        return self._values_by_pos.narrow(1, 0, self._length - self._start)

    @past_values.setter
    def past_values(self, values: Tensor) -> None:
        self._overwrite(self._values, values, "past_values")
        self._graph_values = _tracked(values)

    @property
    def tracks_graph(self) -> bool:
        """Whether the committed keys or values are kept as tensors autograd tracks."""
        return self._graph_keys is not None or self._graph_values is not None

    def _overwrite(self, buffer: Tensor, new: Tensor, name: str) -> None:
        """Assigning ``past_keys``/``past_values`` writes into the storage (same shape only)."""
        if not isinstance(new, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(new).__name__}")
        held = self._length - self._start
        expected = (self.batch_size, held, self.n_kv_heads, self.d_head)
        if tuple(new.shape) != expected:
            raise ValueError(
                f"{name} must keep its shape {expected} when assigned, got {tuple(new.shape)}; "
                "build a new KeyValueCacheEntry to change the length"
            )
        if new.dtype != self.dtype:
            raise TypeError(f"{name} must have dtype {self.dtype}, got {new.dtype}")
        if new.device != self.device:
            raise ValueError(f"{name} is on {new.device}, this cache entry is on {self.device}")
        buffer[:, :, :held].copy_(new.detach().transpose(1, 2))

    # Shape facts ------------------------------------------------------------------------------

    @property
    def length(self) -> int:
        """Committed positions."""
        return self._length

    @property
    def start(self) -> int:
        """The cache index of the first position held: 0 unless a bounded entry dropped some."""
        return self._start

    @property
    def batch_size(self) -> int:
        return self._batch

    @property
    def n_kv_heads(self) -> int:
        return self._heads

    @property
    def capacity(self) -> int:
        """Positions the storage holds before it must grow."""
        return self._capacity

    @property
    def d_head(self) -> int:
        return self._d_head

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def nbytes(self) -> int:
        """Bytes held by the storage (keys and values)."""
        return self._keys.nbytes + self._values.nbytes

    # Operations -------------------------------------------------------------------------------

    def append(
        self,
        new_keys: Float[Tensor, "batch new_tokens kv_head d_head"],
        new_values: Float[Tensor, "batch new_tokens kv_head d_head"],
    ) -> tuple[
        Float[Tensor, "batch pos_so_far_plus_new kv_head d_head"],
        Float[Tensor, "batch pos_so_far_plus_new kv_head d_head"],
    ]:
        """Write new keys and values after the committed ones and return all of them.

        The new positions are stored (the length advances) unless the entry is frozen. Invalid
        input raises before anything is written.

        Returns:
            Views of the keys and values of the committed plus the new positions.
        """
        self.check_new(new_keys, new_values)
        self._make_room(new_keys.shape[1])
        start = self._length - self._start
        end = start + new_keys.shape[1]
        tracked = torch.is_grad_enabled() and (
            new_keys.requires_grad or new_values.requires_grad or self.tracks_graph
        )
        if not tracked:
            self._keys_by_pos.narrow(1, start, end - start).copy_(new_keys)
            self._values_by_pos.narrow(1, start, end - start).copy_(new_values)
            self._commit(end - start)
            return self._keys_by_pos.narrow(1, 0, end), self._values_by_pos.narrow(1, 0, end)
        # Autograd: out of place over the past keys (the graph kept, or the storage), so that no
        # tensor autograd saved is ever written again; the storage gets the values, detached.
        keys = torch.cat((self.past_keys, new_keys), dim=1)
        values = torch.cat((self.past_values, new_values), dim=1)
        self._keys_by_pos.narrow(1, start, end - start).copy_(new_keys.detach())
        self._values_by_pos.narrow(1, start, end - start).copy_(new_values.detach())
        if not self.frozen:
            self._length = self._start + end
            self._graph_keys, self._graph_values = keys, values
        return keys, values

    def append_for_attention(
        self,
        new_keys: Float[Tensor, "batch new_tokens kv_head d_head"],
        new_values: Float[Tensor, "batch new_tokens kv_head d_head"],
    ) -> KeySet:
        """:meth:`append`, returning the keys and values in attention's layout (views)."""
        keys, values = self.append(new_keys, new_values)
        return KeySet(keys.transpose(1, 2), values.transpose(1, 2), start=self._start)

    def claim(
        self, n_new: int
    ) -> (
        tuple[
            Float[Tensor, "batch kv_head capacity d_head"],
            Float[Tensor, "batch kv_head capacity d_head"],
            int,
        ]
        | None
    ):
        """Room for ``n_new`` positions after the committed ones, for a writer of its own.

        :meth:`append` for code that writes the storage itself (the native decode layer):
        returns the key and value storage ``[batch, kv_head, capacity, d_head]`` (grown if need
        be) and the first position to write (a storage index: the cache index minus
        :attr:`start`). Nothing is committed until :meth:`commit`. An entry whose keys are not
        all in such a storage (a shared prefix's) returns ``None``.
        """
        self._make_room(n_new)
        return self._keys, self._values, self._length - self._start

    def _make_room(self, n_new: int) -> None:
        """Storage for ``n_new`` more positions: grown, or for a bounded entry, compacted."""
        held = self._length - self._start
        if self.bound is None:
            if held + n_new > self._capacity:
                self.reserve(self._length + n_new)
            return
        keep_from = max(self._start, self._length - (self.bound - 1))
        room = (self.bound - 1) + max(n_new, BOUNDED_SLACK)
        if held + n_new <= self._capacity and self._capacity <= 2 * room:
            return
        # Keep the committed positions a query from now on can see (all a checkpoint taken
        # before this append needs), in storage sized for the window and this pass.
        kept = self._length - keep_from
        skip = keep_from - self._start
        keys = self._keys_by_pos.narrow(1, skip, kept)
        values = self._values_by_pos.narrow(1, skip, kept)
        dims = (self._batch, self._heads, room, self._d_head)
        if self._graph_keys is not None:
            self._graph_keys = self._graph_keys.narrow(1, skip, kept)
        if self._graph_values is not None:
            self._graph_values = self._graph_values.narrow(1, skip, kept)
        self._set_storage(_new_storage(keys, *dims, kept), _new_storage(values, *dims, kept))
        self._start = keep_from

    def commit(self, n_new: int) -> None:
        """Count ``n_new`` positions written after a :meth:`claim` (unless frozen, as appends)."""
        self._commit(n_new)

    def _commit(self, n_new: int) -> None:
        """Advance the length after an untracked write; a graph kept before no longer covers it."""
        if not self.frozen:
            self._length += n_new
            self._graph_keys = self._graph_values = None

    def check_new(self, new_keys: Tensor, new_values: Tensor) -> None:
        """Raise ``ValueError``/``TypeError`` unless these can be appended to this entry."""
        _check_pair(new_keys, new_values, names=("new_keys", "new_values"))
        batch, _, heads, d_head = new_keys.shape
        if batch != self._batch:
            raise ValueError(
                f"new_keys has batch size {batch}, this cache entry stores {self._batch}"
            )
        if heads != self._heads:
            raise ValueError(
                f"new_keys has {heads} kv heads, this cache entry stores {self._heads}"
            )
        if d_head != self._d_head:
            raise ValueError(
                f"new_keys has d_head {d_head}, this cache entry stores {self._d_head}"
            )
        if new_keys.dtype != self._dtype:
            raise TypeError(
                f"new_keys has dtype {new_keys.dtype}, this cache entry stores {self._dtype}"
            )
        if new_keys.device != self._device or new_values.device != self._device:
            raise ValueError(
                f"new_keys is on {new_keys.device} and new_values on {new_values.device}, this "
                f"cache entry is on {self._device}"
            )

    def reserve(self, capacity: int) -> None:
        """Make room for ``capacity`` positions (growing geometrically); keeps the contents.

        A bounded entry makes room for at most its window and a pass of slack, whatever
        ``capacity`` says: it drops positions instead of growing.
        """
        held = capacity - self._start
        if self.bound is not None:
            held = min(held, self.bound - 1 + BOUNDED_SLACK)
        if held <= self._capacity:
            return
        new_capacity = _grown_capacity(self._capacity, held)
        dims = (self._batch, self._heads, new_capacity, self._d_head)
        count = self._length - self._start
        self._set_storage(
            _new_storage(self._keys_by_pos.narrow(1, 0, count), *dims, count),
            _new_storage(self._values_by_pos.narrow(1, 0, count), *dims, count),
        )

    def crop(self, length: int) -> None:
        """Keep the first ``length`` positions (``0 <= length <= self.length``): O(1).

        The dropped positions stay in the storage and are overwritten by the next append.
        """
        if isinstance(length, bool) or not isinstance(length, int):
            raise TypeError(f"crop length must be an int, got {type(length).__name__}")
        if not 0 <= length <= self._length:
            raise ValueError(f"crop length must be in [0, {self._length}], got {length}")
        if self.bound is not None and length > 0 and max(0, length - self.bound + 1) < self._start:
            raise ValueError(
                f"cannot crop this bounded cache entry to {length} positions: it dropped the "
                f"positions before {self._start}, which a query after position {length - 1} "
                "would see (crop to at least "
                f"{self._start + self.bound - 1}, or 0, or use an unbounded cache)"
            )
        if length == 0:
            self._start = 0
        self._length = length
        held = length - self._start
        if self._graph_keys is not None:
            self._graph_keys = self._graph_keys.narrow(1, 0, held)
        if self._graph_values is not None:
            self._graph_values = self._graph_values.narrow(1, 0, held)

    def select(self, indices: Tensor) -> None:
        """Keep rows ``indices`` (valid int64 indices, any order, repeats allowed) in place.

        Only the committed positions are copied. With as many rows as before (beam search's
        reorder) the storage is reused; otherwise new storage of the same capacity replaces it.
        A graph kept by the entry is selected too, so gradients still reach the chosen rows.
        """
        length = self._length - self._start
        indices = indices.to(self._device)
        keys = self._keys.narrow(2, 0, length).index_select(0, indices)
        values = self._values.narrow(2, 0, length).index_select(0, indices)
        if self._graph_keys is not None:
            self._graph_keys = self._graph_keys.index_select(0, indices)
        if self._graph_values is not None:
            self._graph_values = self._graph_values.index_select(0, indices)
        if indices.numel() == self._batch:
            self._keys.narrow(2, 0, length).copy_(keys)
            self._values.narrow(2, 0, length).copy_(values)
            return
        dims = (indices.numel(), self._heads, self._capacity, self._d_head)
        self._set_storage(
            _new_storage(keys.transpose(1, 2), *dims, length),
            _new_storage(values.transpose(1, 2), *dims, length),
        )
        self._batch = indices.numel()

    def patch(
        self,
        source: KeyValueCacheEntry,
        heads: Int[Tensor, " heads"],
        positions: Int[Tensor, " positions"],
        keys: bool = True,
        values: bool = True,
    ) -> None:
        """Copy ``source``'s keys and/or values at key/value heads ``heads`` and cache positions
        ``positions`` into this entry, in place.

        The caller (:meth:`KeyValueCache.patch_from`) has checked the selection against both
        entries; ``source``'s batch is this entry's or 1 (then every row gets it).
        """
        if self.tracks_graph:
            raise ValueError(
                "this cache entry keeps an autograd graph of its keys and values; patching the "
                "storage would leave the graph stale (patch a cache filled under torch.no_grad())"
            )
        heads = heads.to(self._device)[:, None]
        here = (positions.to(self._device) - self._start)[None, :]
        there = (positions.to(source.device) - source.start)[None, :]
        src_heads = heads.to(source.device)
        for wanted, mine, theirs in (
            (keys, self._keys, source._keys),
            (values, self._values, source._values),
        ):
            if wanted:
                mine[:, heads, here] = theirs[:, src_heads, there].to(self._device)

    def checkpoint(self) -> EntryCheckpoint:
        """What :meth:`restore` needs to undo later appends: the length and the graph kept.

        Cheap (a few references): forward passes take one per layer so that a pass that fails
        midway leaves the entry as it found it.
        """
        return EntryCheckpoint(self._length, self._graph_keys, self._graph_values)

    def clone(self) -> KeyValueCacheEntry:
        """An independent copy: contents (and the graph kept, if any), capacity, bound, start
        and frozen flag."""
        return KeyValueCacheEntry(
            self.past_keys,
            self.past_values,
            frozen=self.frozen,
            capacity=self._capacity,
            bound=self.bound,
            start=self._start,
        )

    def restore(self, state: EntryCheckpoint) -> None:
        """Go back to ``state`` (taken by :meth:`checkpoint` on this entry since its last
        ``select``): positions appended since are forgotten, those before it are untouched."""
        if not 0 <= state.length - self._start <= self._capacity:
            raise ValueError(f"checkpoint length {state.length} is outside this entry's storage")
        self._length = state.length
        self._graph_keys, self._graph_values = state.graph_keys, state.graph_values

    def freeze(self) -> None:
        """Appends stop advancing the committed length."""
        self.frozen = True

    def unfreeze(self) -> None:
        """Appends advance the committed length again."""
        self.frozen = False

    def __repr__(self) -> str:
        return (
            f"KeyValueCacheEntry(batch={self.batch_size}, length={self._length}, "
            f"capacity={self.capacity}, kv_heads={self.n_kv_heads}, d_head={self.d_head}, "
            f"dtype={self.dtype}, frozen={self.frozen}"
            + ("" if self.bound is None else f", bound={self.bound}, start={self._start}")
            + ")"
        )


def _new_storage(
    contents: Float[Tensor, "batch pos kv_head d_head"],
    batch: int,
    heads: int,
    capacity: int,
    d_head: int,
    pos: int,
) -> Float[Tensor, "batch kv_head capacity d_head"]:
    """A ``[batch, kv_head, capacity, d_head]`` buffer holding ``contents`` in its first positions.

    The unused positions are zeroed now, in one sequential pass. Left as ``torch.empty`` they would
    be mapped lazily, and every decode step would then fault in fresh pages scattered over all
    ``batch * kv_head`` rows: that made the per-token cost grow with the capacity (at batch 8 the
    last 1,024 of 8,192 appends took 3x the first 1,024, see docs/benchmarks.md).

    The buffer is a normal tensor even under ``torch.inference_mode``: an inference tensor could
    not be written in place afterwards, so a cache grown during inference-mode generation would
    fail in a later ``no_grad`` forward pass (a ``torch.cat`` cache has no such limit).
    """
    with torch.inference_mode(False):
        storage = torch.empty(
            (batch, heads, capacity, d_head), dtype=contents.dtype, device=contents.device
        )
        storage[:, :, :pos].copy_(contents.detach().transpose(1, 2))
        storage[:, :, pos:].zero_()
    return storage


def _tracked(t: Tensor) -> Tensor | None:
    """``t`` itself when autograd tracks it (grad mode on, ``t`` requires grad), else ``None``."""
    return t if torch.is_grad_enabled() and t.requires_grad else None


def _check_pair(
    keys: Tensor, values: Tensor, names: tuple[str, str] = ("past_keys", "past_values")
) -> None:
    k, v = names
    for name, t in ((k, keys), (v, values)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(
                f"{name} must be 4-D [batch, pos, kv_head, d_head], got shape {tuple(t.shape)}"
            )
    if keys.shape != values.shape:
        raise ValueError(
            f"{k} and {v} must have the same shape, "
            f"got {tuple(keys.shape)} and {tuple(values.shape)}"
        )
    if keys.dtype != values.dtype:
        raise TypeError(
            f"{k} and {v} must have the same dtype, got {keys.dtype} and {values.dtype}"
        )
    if not keys.is_floating_point():
        raise TypeError(f"{k} must be a floating-point tensor, got {keys.dtype}")


# TransformerLens's name for the same thing.
HookedTransformerKeyValueCacheEntry = KeyValueCacheEntry
