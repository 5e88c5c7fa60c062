"""Products and dequantization on ggml's quantized weight blocks (``quant.c``).

A quantized weight is ``[d_out, d_in]`` as a GGUF file stores it: each output row a row of
32-weight blocks along ``d_in`` (Q4_0, Q4_1, Q8_0; ``quant.c`` describes the bytes), held here as
a contiguous ``uint8`` tensor ``[d_out, row_bytes]``. :func:`qmatmul` multiplies a decode step's
few rows by it without dequantizing, :func:`qdequantize` turns rows of it into fp32 (a tile of a
prefill's product). Both return ``None`` where the kernels do not apply (no library, autograd,
more rows than ``max_rows``, a layout they do not take), as the other kernels do.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, UInt8
from torch import Tensor

from kvlens.kernels import _native, _plain, _rows

QUANT_TYPES = {"q4_0": 2, "q4_1": 3, "q8_0": 8}
"""The block formats the kernels compute on, by name, with ggml's type number (GGUF's)."""


def block_bytes(qtype: int) -> int | None:
    """Bytes of one 32-weight block of ``qtype`` as the library has them, or ``None`` (no
    library, or a type it does not take)."""
    native = _native()
    if native is None:
        return None
    n = int(native[0].kvlens_qblock_bytes(qtype))
    return n or None


def blocks_ok(blocks: Tensor, qtype: int, d_in: int) -> bool:
    """Whether ``blocks`` is a contiguous CPU ``uint8 [d_out, row_bytes]`` of ``qtype`` blocks
    along ``d_in``, and the library takes that type."""
    size = block_bytes(qtype)
    return (
        size is not None
        and blocks.dtype is torch.uint8
        and blocks.is_cpu
        and blocks.dim() == 2
        and blocks.is_contiguous()
        and d_in > 0
        and d_in % 32 == 0
        and blocks.shape[1] == d_in // 32 * size
    )


def qmatmul(
    x: Float[Tensor, "... d_in"],
    blocks: UInt8[Tensor, "d_out row_bytes"],
    qtype: int,
    bias: Float[Tensor, " d_out"] | None = None,
    threads: int | None = None,
) -> Float[Tensor, "... d_out"] | None:
    """``x @ W.T + bias`` with ``W`` the dequantized ``blocks``, for at most ``max_rows`` rows of
    ``x``, or ``None`` where the kernel does not apply.

    Each output is summed by one thread in one fixed order: a row's result is bitwise the same
    computed alone or in a batch, on any number of threads.

    Args:
        x: The rows; their last axis ``d_in``, contiguous.
        blocks: ``[d_out, d_in / 32 * block_bytes]`` of type ``qtype``.
        qtype: ggml's type number (:data:`QUANT_TYPES`).
        bias: Optional ``[d_out]``.
        threads: Threads; default torch's count.
    """
    native = _native()
    if native is None:
        return None
    lib, lim = native
    d_in = x.shape[-1]
    n_rows = x.numel() // d_in if d_in else 0
    if not 0 < n_rows <= lim.max_rows or not _plain(x) or not blocks_ok(blocks, qtype, d_in):
        return None
    d_out = blocks.shape[0]
    if bias is not None and not (_plain(bias) and bias.is_contiguous() and bias.shape == (d_out,)):
        return None
    rows, row_stride = _rows(x, n_rows)
    out = torch.empty((*x.shape[:-1], d_out), dtype=torch.float32)
    status = lib.kvlens_qmatmul(
        n_rows, d_in, d_out, qtype, blocks.data_ptr(), rows.data_ptr(), row_stride,
        None if bias is None else bias.data_ptr(), out.data_ptr(), d_out,
        torch.get_num_threads() if threads is None else threads,
    )  # fmt: skip
    return out if status == 0 else None


def qdequantize(
    blocks: UInt8[Tensor, "d_out row_bytes"],
    qtype: int,
    d_in: int,
    start: int = 0,
    stop: int | None = None,
    threads: int | None = None,
) -> Float[Tensor, "rows d_in"] | None:
    """Rows ``start .. stop`` of the dequantized weight as fp32 ``[rows, d_in]`` (exact), or
    ``None`` where the kernel does not apply."""
    native = _native()
    if native is None or not blocks_ok(blocks, qtype, d_in):
        return None
    stop = blocks.shape[0] if stop is None else stop
    if not 0 <= start <= stop <= blocks.shape[0]:
        raise ValueError(f"rows {start}..{stop} are not within the {blocks.shape[0]} rows")
    out = torch.empty((stop - start, d_in), dtype=torch.float32)
    status = native[0].kvlens_qdequantize(
        d_in, qtype, blocks.data_ptr(), start, stop - start, out.data_ptr(),
        torch.get_num_threads() if threads is None else threads,
    )  # fmt: skip
    return out if status == 0 else None
