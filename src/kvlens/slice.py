"""``Slice``: TransformerLens's way of picking positions, heads, neurons or rows on one axis."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

SliceMode = Literal["int", "slice", "array", "identity"]
SliceInput = int | slice | tuple[int | None, ...] | list[int] | Tensor | np.ndarray | None


class Slice:
    """One index for one axis, built from the forms TransformerLens's analysis methods accept.

    ``None`` keeps the whole axis; an int picks one entry and drops the axis; a tuple is
    ``slice(*t)``; a slice is used as it is; a list, tensor or array lists the entries to keep.

    Attributes:
        slice: The index itself (an int, a slice, or a 1-D tensor of indices or a boolean mask).
        mode: Which form it came from: ``"int"``, ``"slice"``, ``"array"`` or ``"identity"``.
    """

    slice: int | slice | Tensor
    mode: SliceMode

    def __init__(self, input_slice: SliceInput | Slice = None) -> None:
        if isinstance(input_slice, Slice):
            self.slice, self.mode = input_slice.slice, input_slice.mode
        elif isinstance(input_slice, tuple):
            self.slice, self.mode = slice(*input_slice), "slice"
        elif isinstance(input_slice, int):
            self.slice, self.mode = int(input_slice), "int"
        elif isinstance(input_slice, slice):
            self.slice, self.mode = input_slice, "slice"
        elif isinstance(input_slice, (list, Tensor, np.ndarray)):
            index = torch.as_tensor(input_slice)
            if index.dtype != torch.bool:
                index = index.long()
            self.slice, self.mode = index.cpu(), "array"
        elif input_slice is None:
            self.slice, self.mode = slice(None), "identity"
        else:
            raise ValueError(
                "a slice must be None, an int, a (start, stop[, step]) tuple, a slice, or a list, "
                f"tensor or array of indices; got {type(input_slice).__name__}"
            )

    def apply(self, tensor: Tensor, dim: int = 0) -> Tensor:
        """``tensor`` indexed on axis ``dim`` (an int slice removes that axis)."""
        index: list[int | slice | Tensor] = [slice(None)] * tensor.ndim
        index[dim] = self.slice
        return tensor[tuple(index)]

    def indices(self, max_ctx: int | None = None) -> np.ndarray:
        """The indices this slice keeps on an axis of length ``max_ctx``.

        Raises:
            ValueError: If ``max_ctx`` is missing and the slice is not an int.
        """
        if self.mode == "int":
            return np.array([self.slice], dtype=np.int64)
        if max_ctx is None:
            raise ValueError("indices() needs max_ctx unless the slice is an int")
        kept = torch.arange(max_ctx)[self.slice]
        return kept.numpy().astype(np.int64)

    @classmethod
    def unwrap(cls, slice_input: SliceInput | Slice) -> Slice:
        """A ``Slice`` of ``slice_input``; an int becomes ``[int]`` so the axis is kept."""
        if isinstance(slice_input, Slice):
            return slice_input
        if isinstance(slice_input, int):
            return cls([slice_input])
        return cls(slice_input)

    def __repr__(self) -> str:
        return f"Slice({self.slice!r}, mode={self.mode!r})"
