"""``x @ W + b`` with ``W`` stored ``[in, out]``, the layout kvlens keeps its weights in."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from kvlens import kernels
from kvlens.quantized import QuantizedMatrix


def linear(
    x: Float[Tensor, "... d_in"],
    weight: Float[Tensor, "d_in d_out"] | QuantizedMatrix,
    bias: Tensor | None,
) -> Float[Tensor, "... d_out"]:
    """Apply a weight stored ``[in, out]`` (and an optional bias) to the last axis of ``x``.

    A decode step's few rows go to kvlens's native kernel when it is available
    (:mod:`kvlens.kernels`), which streams the weight at close to memory speed. Otherwise, on
    CPU, ``x @ W`` with ``W`` contiguous ``[in, out]`` runs about twice as fast for single-token
    decoding as ``F.linear`` with ``[out, in]``, which is why every projection is stored this way.
    With a bias the product and the sum are one ``addmm`` call.

    A weight held as quantized blocks (:class:`~kvlens.quantized.QuantizedMatrix`, ``[out,
    in]``: a quantized model's) is multiplied on its blocks for a decode step's few rows, a tile
    of dequantized rows at a time for more (:meth:`QuantizedMatrix.matmul`).
    """
    if isinstance(weight, QuantizedMatrix):
        return weight.matmul(x, bias)
    native = kernels.matmul(x, weight, bias)
    if native is not None:
        return native
    if bias is None:
        return x @ weight
    flat = x.reshape(-1, x.shape[-1])
    return torch.addmm(bias, flat, weight).view(*x.shape[:-1], weight.shape[-1])
