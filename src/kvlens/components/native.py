"""What a component says about itself to the fused native decode layer.

Each of kvlens's norm, attention and MLP classes has a ``native()`` method returning one of these
descriptions (its weights and its kind), or ``None`` when the native layer cannot compute it (a
replaced activation, soft-capped attention, a subclass with its own ``forward``). A block's
decode plan (:mod:`kvlens.components.decode_plan`) is built from them.
"""

from __future__ import annotations

from typing import NamedTuple

from jaxtyping import Float
from torch import Tensor

from kvlens.quantized import QuantizedMatrix

Matrix = Float[Tensor, "d_in d_out"] | QuantizedMatrix
"""A weight matrix: fp32 ``[in, out]``, or blocks ``[out, in]`` (a quantized model's)."""


class NativeNorm(NamedTuple):
    """A LayerNorm (``layer_norm``, with bias ``b``) or an RMSNorm (``b`` is ``None``)."""

    layer_norm: bool
    eps: float
    w: Float[Tensor, " d_model"]
    b: Float[Tensor, " d_model"] | None


class NativeAttention(NamedTuple):
    """Fused q/k/v and output projections, and the attention rules the kernel follows."""

    w_qkv: Matrix
    b_qkv: Float[Tensor, " qkv"] | None
    w_o: Matrix
    b_o: Float[Tensor, " d_model"] | None
    n_heads: int
    n_kv_heads: int
    d_head: int
    scale: float
    window: int | None
    rotary: bool
    rotary_adjacent_pairs: bool


class NativeMLP(NamedTuple):
    """A plain MLP with activation ``act`` (a code of ``kernels.ACTIVATIONS``), or a gated SiLU
    MLP (``act`` ``None``, ``w_in`` the gate and input side by side)."""

    act: int | None
    w_in: Matrix
    b_in: Float[Tensor, " mlp_in"] | None
    w_out: Matrix
    b_out: Float[Tensor, " d_model"] | None
