"""The cache's attention mask so far, in preallocated storage written in place."""

from __future__ import annotations

import torch
from jaxtyping import Int
from torch import Tensor

from kvlens.cache.entry import _grown_capacity

MASK_DTYPE = torch.int


class MaskStorage:
    """An attention mask ``[batch, length]`` held in ``[batch, capacity]`` int32 storage.

    The length is tracked as a number, never inferred from the data, so that a decode step
    copies nothing but its own column. A write can be staged (written after the committed
    length but not yet counted) and committed later: see :meth:`write` and :meth:`commit`.
    """

    def __init__(
        self, contents: Int[Tensor, "batch pos"], capacity: int, device: torch.device
    ) -> None:
        """Storage of ``max(capacity, pos)`` positions on ``device``, holding ``contents`` first."""
        self.storage = _new_storage(contents, max(capacity, contents.shape[1]), device)
        self._length = contents.shape[1]
        self._staged_length: int | None = None

    @property
    def length(self) -> int:
        """Committed positions."""
        return self._length

    @property
    def capacity(self) -> int:
        """Positions the storage holds before it must grow."""
        return self.storage.shape[1]

    @property
    def batch_size(self) -> int:
        return self.storage.shape[0]

    @property
    def device(self) -> torch.device:
        return self.storage.device

    @property
    def nbytes(self) -> int:
        """Bytes held by the storage, used or not."""
        return self.storage.nbytes

    @property
    def nbytes_used(self) -> int:
        """Bytes of the committed positions."""
        return self.batch_size * self._length * self.storage.element_size()

    def view(self) -> Int[Tensor, "batch length"]:
        """The committed mask: a view of the storage, not a copy."""
        return self.storage.narrow(1, 0, self._length)

    def check(self, mask: Tensor, name: str) -> None:
        """Raise unless ``mask`` is a 2-D integer or boolean tensor of this batch size."""
        check_mask(mask, name, self.batch_size)

    def replace(self, mask: Int[Tensor, "batch pos"]) -> None:
        """Hold exactly ``mask`` (checked by the caller), keeping the storage when it fits."""
        pos = mask.shape[1]
        self.reserve(pos)
        self.storage[:, :pos].copy_(mask)
        self._length = pos

    def write(self, mask: Int[Tensor, "batch new"]) -> Int[Tensor, "batch length_plus_new"]:
        """Write ``mask`` after the committed positions and stage them; return the full mask.

        The committed length stays as it is until :meth:`commit`.
        """
        start = self._length
        end = start + mask.shape[1]
        self.reserve(end)
        self.storage.narrow(1, start, end - start).copy_(mask)
        self._staged_length = end
        return self.storage.narrow(1, 0, end)

    def commit(self, advance: bool = True) -> None:
        """Count what :meth:`write` staged (unless ``advance`` is False), then forget the stage."""
        if self._staged_length is not None and advance:
            self._length = self._staged_length
        self._staged_length = None

    def crop(self, length: int) -> None:
        """Keep the first ``length`` positions (checked by the caller): O(1), storage kept."""
        self._length = length

    def restore(self, length: int) -> None:
        """Go back to ``length`` committed positions (a :attr:`length` read earlier), unstaged."""
        self._length = length
        self._staged_length = None

    def select(self, indices: Int[Tensor, " new_batch"]) -> None:
        """Keep rows ``indices`` (valid int64 indices) of the committed mask, in that order.

        With as many rows as before the storage is reused; otherwise new storage of the same
        capacity replaces it.
        """
        mask = self.view().index_select(0, indices.to(self.device))
        if indices.numel() == self.batch_size:
            self.view().copy_(mask)
        else:
            self.storage = _new_storage(mask, self.capacity, self.device)

    def reserve(self, capacity: int) -> None:
        """Make room for ``capacity`` positions (growing geometrically); keeps the contents."""
        if capacity <= self.capacity:
            return
        grown = _grown_capacity(self.capacity, capacity)
        self.storage = _new_storage(self.view(), grown, self.device)


def check_mask(mask: Tensor, name: str, batch: int) -> None:
    """Raise unless ``mask`` is a 2-D integer or boolean tensor of ``batch`` rows."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.ndim != 2:
        raise ValueError(f"{name} must be 2-D [batch, pos], got shape {tuple(mask.shape)}")
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"{name} must hold integers or booleans, got {mask.dtype}")
    if mask.shape[0] != batch:
        raise ValueError(f"{name} has batch size {mask.shape[0]}, this cache stores {batch}")


def _new_storage(
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
