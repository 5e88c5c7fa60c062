"""Weights kept as ggml's 4- and 8-bit blocks, multiplied without an fp32 copy of the matrix.

A :class:`QuantizedMatrix` is a weight ``[d_out, d_in]`` stored as a GGUF file stores it: every
output row a row of 32-weight blocks (Q4_0, Q4_1, Q8_0; :mod:`kvlens.kernels.quantized` and
``quant.c`` give the bytes). Dequantized, a block is exact, so a product on the blocks is the
product with the dequantized fp32 matrix up to the order of its additions. :meth:`matmul` runs a
decode step's few rows on the blocks (the native kernel) and many rows (a prefill) one tile of
dequantized rows at a time, never holding an fp32 copy of the whole matrix.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int, UInt8
from torch import Tensor

from kvlens.kernels.quantized import QUANT_TYPES, qdequantize, qmatmul

TILE_FLOATS = 1 << 21
"""Floats of dequantized weight a many-row product holds at once (8 MB)."""


def _gguf_type(name: str) -> Any:
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[name.upper()]


def block_bytes(name: str) -> int:
    """Bytes of one 32-weight block of format ``name`` (``"q4_0"``, ``"q4_1"``, ``"q8_0"``)."""
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[_gguf_type(name)]
    assert block == 32
    return int(size)


class QuantizedMatrix:
    """A ``[d_out, d_in]`` weight as rows of ggml blocks along ``d_in``.

    Args:
        blocks: ``uint8`` ``[d_out, d_in / 32 * block_bytes(fmt)]``, contiguous.
        d_in: The input width (a multiple of 32).
        fmt: ``"q4_0"``, ``"q4_1"`` or ``"q8_0"``.
    """

    def __init__(self, blocks: UInt8[Tensor, "d_out row_bytes"], d_in: int, fmt: str) -> None:
        if fmt not in QUANT_TYPES:
            raise ValueError(f"fmt must be one of {sorted(QUANT_TYPES)}, got {fmt!r}")
        if d_in <= 0 or d_in % 32:
            raise ValueError(f"d_in must be a positive multiple of 32 (the block), got {d_in}")
        row_bytes = d_in // 32 * block_bytes(fmt)
        if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != row_bytes:
            raise ValueError(
                f"blocks must be uint8 [d_out, {row_bytes}] for {fmt} with d_in={d_in}, got "
                f"{blocks.dtype} {tuple(blocks.shape)}"
            )
        self.blocks = blocks.contiguous()
        self.d_in = d_in
        self.fmt = fmt
        self.qtype = QUANT_TYPES[fmt]

    @classmethod
    def quantize(cls, weight: Float[Tensor, "d_out d_in"], fmt: str) -> QuantizedMatrix:
        """``weight`` rounded to ``fmt``'s blocks as ggml's reference quantizer rounds it."""
        from gguf.quants import quantize

        if weight.dim() != 2:
            raise ValueError(f"weight must be [d_out, d_in], got {tuple(weight.shape)}")
        array = weight.detach().to("cpu", torch.float32).numpy()
        blocks = quantize(np.ascontiguousarray(array), _gguf_type(fmt))
        return cls(torch.from_numpy(np.ascontiguousarray(blocks)), weight.shape[1], fmt)

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_out, d_in)``."""
        return self.blocks.shape[0], self.d_in

    @property
    def nbytes(self) -> int:
        """Bytes the blocks take."""
        return self.blocks.numel()

    def dequantize(self, start: int = 0, stop: int | None = None) -> Float[Tensor, "rows d_in"]:
        """Output rows ``start .. stop`` as fp32 ``[rows, d_in]``, exactly."""
        out = qdequantize(self.blocks, self.qtype, self.d_in, start, stop)
        if out is not None:
            return out
        from gguf.quants import dequantize

        rows = self.blocks[start:stop].numpy()
        array = dequantize(rows, _gguf_type(self.fmt)).reshape(rows.shape[0], self.d_in)
        return torch.from_numpy(np.array(array, dtype=np.float32))

    def rows(self, index: Int[Tensor, " n"]) -> Float[Tensor, "n d_in"]:
        """Output rows ``index`` as fp32 ``[n, d_in]``, exactly (an embedding's lookup)."""
        n_rows = self.blocks.shape[0]
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n_rows):
            raise IndexError(
                f"row indices must be in [0, {n_rows}), got {int(index.min())}..{int(index.max())}"
            )
        picked = QuantizedMatrix(self.blocks[index.to(self.blocks.device)], self.d_in, self.fmt)
        return picked.dequantize()

    def matmul(
        self, x: Float[Tensor, "... d_in"], bias: Float[Tensor, " d_out"] | None = None
    ) -> Float[Tensor, "... d_out"]:
        """``x @ W.T + bias``: on the blocks for a few rows, else a tile of rows at a time."""
        if x.shape[-1] != self.d_in:
            raise ValueError(f"x must end in d_in={self.d_in}, got {tuple(x.shape)}")
        out = qmatmul(x, self.blocks, self.qtype, bias)
        if out is not None:
            return out
        d_out = self.blocks.shape[0]
        tile = max(1, TILE_FLOATS // self.d_in)
        pieces = []
        for start in range(0, d_out, tile):
            stop = min(d_out, start + tile)
            weight = self.dequantize(start, stop).to(x.dtype)
            piece = x @ weight.T
            pieces.append(piece if bias is None else piece + bias[start:stop])
        return torch.cat(pieces, dim=-1)
