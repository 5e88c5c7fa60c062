"""One layer's past keys and values, in preallocated storage written in place."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from kvlens.config import ModelConfig

# Smallest capacity a buffer grows to; avoids a run of tiny reallocations during the first steps.
MIN_CAPACITY = 16


def _grown_capacity(capacity: int, needed: int) -> int:
    """Geometric growth: at least double, so that appending n tokens costs O(n) amortized."""
    return max(needed, 2 * capacity, MIN_CAPACITY)


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
    """

    def __init__(
        self,
        past_keys: Float[Tensor, "batch pos kv_head d_head"],
        past_values: Float[Tensor, "batch pos kv_head d_head"],
        frozen: bool = False,
        *,
        capacity: int | None = None,
    ) -> None:
        """Build an entry holding copies of ``past_keys`` and ``past_values``.

        Args:
            past_keys: Keys so far, ``[batch, pos, kv_head, d_head]``.
            past_values: Values so far, same shape, dtype and device as ``past_keys``.
            frozen: Whether appends leave the committed length unchanged.
            capacity: Positions to preallocate (at least ``pos``); default ``pos``.
        """
        _check_pair(past_keys, past_values)
        batch, pos, heads, d_head = past_keys.shape
        capacity = pos if capacity is None else capacity
        if capacity < pos:
            raise ValueError(f"capacity must be >= the {pos} positions given, got {capacity}")
        shape = (batch, heads, capacity, d_head)
        self._keys = torch.empty(shape, dtype=past_keys.dtype, device=past_keys.device)
        self._values = torch.empty(shape, dtype=past_keys.dtype, device=past_keys.device)
        self._keys[:, :, :pos].copy_(past_keys.transpose(1, 2))
        self._values[:, :, :pos].copy_(past_values.transpose(1, 2))
        self._length = pos
        self.frozen = frozen

    @classmethod
    def init_cache_entry(
        cls,
        cfg: ModelConfig,
        device: torch.device | str | None,
        batch_size: int = 1,
        capacity: int = 0,
    ) -> KeyValueCacheEntry:
        """An empty entry for a layer of ``cfg``.

        Stores ``cfg.n_key_value_heads`` heads when set (grouped-query attention), else
        ``cfg.n_heads``, in ``cfg.dtype`` whatever torch's default dtype is.

        Args:
            cfg: The model's config.
            device: Where the buffers live.
            batch_size: Rows of the batch.
            capacity: Positions to preallocate; the buffers grow past it when needed.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        empty = torch.empty((batch_size, 0, cfg.n_kv_heads, cfg.d_head), dtype=cfg.dtype, device=device)
        return cls(empty, empty, capacity=capacity)

    # Views ------------------------------------------------------------------------------------

    @property
    def past_keys(self) -> Float[Tensor, "batch pos_so_far kv_head d_head"]:
        """The committed keys: a view of the storage, not a copy."""
        return self._keys[:, :, : self._length].transpose(1, 2)

    @past_keys.setter
    def past_keys(self, keys: Tensor) -> None:
        self._overwrite(self._keys, keys, "past_keys")

    @property
    def past_values(self) -> Float[Tensor, "batch pos_so_far kv_head d_head"]:
        """The committed values: a view of the storage, not a copy."""
        return self._values[:, :, : self._length].transpose(1, 2)

    @past_values.setter
    def past_values(self, values: Tensor) -> None:
        self._overwrite(self._values, values, "past_values")

    def _overwrite(self, buffer: Tensor, new: Tensor, name: str) -> None:
        """Assigning ``past_keys``/``past_values`` writes into the storage (same shape only)."""
        expected = (self.batch_size, self._length, self.n_kv_heads, self.d_head)
        if tuple(new.shape) != expected:
            raise ValueError(
                f"{name} must keep its shape {expected} when assigned, got {tuple(new.shape)}; "
                "build a new KeyValueCacheEntry to change the length"
            )
        if new.dtype != self.dtype:
            raise TypeError(f"{name} must have dtype {self.dtype}, got {new.dtype}")
        buffer[:, :, : self._length].copy_(new.transpose(1, 2))

    # Shape facts ------------------------------------------------------------------------------

    @property
    def length(self) -> int:
        """Committed positions."""
        return self._length

    @property
    def batch_size(self) -> int:
        return self._keys.shape[0]

    @property
    def n_kv_heads(self) -> int:
        return self._keys.shape[1]

    @property
    def capacity(self) -> int:
        """Positions the storage holds before it must grow."""
        return self._keys.shape[2]

    @property
    def d_head(self) -> int:
        return self._keys.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self._keys.dtype

    @property
    def device(self) -> torch.device:
        return self._keys.device

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
        start = self._length
        end = start + new_keys.shape[1]
        self.reserve(end)
        self._keys[:, :, start:end].copy_(new_keys.transpose(1, 2))
        self._values[:, :, start:end].copy_(new_values.transpose(1, 2))
        if not self.frozen:
            self._length = end
        keys = self._keys[:, :, :end].transpose(1, 2)
        values = self._values[:, :, :end].transpose(1, 2)
        return keys, values

    def check_new(self, new_keys: Tensor, new_values: Tensor) -> None:
        """Raise ``ValueError``/``TypeError`` unless these can be appended to this entry."""
        _check_pair(new_keys, new_values, names=("new_keys", "new_values"))
        batch, _, heads, d_head = new_keys.shape
        if batch != self.batch_size:
            raise ValueError(
                f"new_keys has batch size {batch}, this cache entry stores {self.batch_size}"
            )
        if heads != self.n_kv_heads:
            raise ValueError(f"new_keys has {heads} kv heads, this cache entry stores {self.n_kv_heads}")
        if d_head != self.d_head:
            raise ValueError(f"new_keys has d_head {d_head}, this cache entry stores {self.d_head}")
        if new_keys.dtype != self.dtype:
            raise TypeError(f"new_keys has dtype {new_keys.dtype}, this cache entry stores {self.dtype}")

    def reserve(self, capacity: int) -> None:
        """Make room for ``capacity`` positions (growing geometrically); keeps the contents."""
        if capacity <= self.capacity:
            return
        new_capacity = _grown_capacity(self.capacity, capacity)
        shape = (self.batch_size, self.n_kv_heads, new_capacity, self.d_head)
        keys = torch.empty(shape, dtype=self.dtype, device=self.device)
        values = torch.empty(shape, dtype=self.dtype, device=self.device)
        keys[:, :, : self._length].copy_(self._keys[:, :, : self._length])
        values[:, :, : self._length].copy_(self._values[:, :, : self._length])
        self._keys, self._values = keys, values

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
            f"dtype={self.dtype}, frozen={self.frozen})"
        )


def _check_pair(keys: Tensor, values: Tensor, names: tuple[str, str] = ("past_keys", "past_values")) -> None:
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
            f"{k} and {v} must have the same shape, got {tuple(keys.shape)} and {tuple(values.shape)}"
        )
    if keys.dtype != values.dtype:
        raise TypeError(f"{k} and {v} must have the same dtype, got {keys.dtype} and {values.dtype}")
    if not keys.is_floating_point():
        raise TypeError(f"{k} must be a floating-point tensor, got {keys.dtype}")


# TransformerLens's name for the same thing.
HookedTransformerKeyValueCacheEntry = KeyValueCacheEntry
