"""Native kernels for the decode hot path, with torch as the fallback.

A decode step multiplies a few rows by every weight matrix of the model. On CPU that is bound by
the speed at which the weights stream from memory, and MKL's one-row products reach only part of
it (docs/benchmarks.md). ``matmul.c`` streams the weights sequentially instead; ``decode.c`` fuses
the small ops around the products (RMSNorm, rotary, the gated MLP's activation), whose torch
per-call cost exceeds their arithmetic on a few rows; ``attention.c`` attends from one new query
per row to the cached keys and values, split across threads by chunks of keys; ``layer.c`` runs
a whole layer of a decode step (any supported family) in one call with the same functions
(:mod:`kvlens.kernels.layer`). See
:mod:`kvlens.kernels.build` for how they are compiled (once per machine) and when they are not
used (:func:`describe` says which, and why).

Each op returns ``None`` for input it does not take (autograd, a dtype other than float32, a
device other than the CPU, more rows than the library's ``max_rows``, an unsupported layout, or no
library), and the caller then runs torch. The checks are written for speed: every call of these
sits on the per-token path.

The limits (rows, attention's group and head width, the one-thread threshold) and the scratch
sizes are the library's own, read from it (:func:`limits`), never copied here.
"""

from __future__ import annotations

import ctypes
import threading

import torch
from jaxtyping import Float
from torch import Tensor

from kvlens.kernels.build import (
    Limits,
    available,
    describe,
    library,
    read_limits,
    unavailable_reason,
)

__all__ = [
    "Limits",
    "activation",
    "available",
    "decode_attention",
    "decode_attention_lse",
    "describe",
    "layer_norm",
    "library",
    "limits",
    "matmul",
    "rms_norm",
    "rotary_",
    "silu_mul",
    "unavailable_reason",
]

ACTIVATIONS = {"gelu": 0, "gelu_new": 1, "gelu_pytorch_tanh": 1, "relu": 2, "silu": 3}
"""The plain MLP's activations the kernels compute, by ``cfg.act_fn`` (``KVLENS_ACT_*`` in
kernels.h): GELU exact (erf), GELU's tanh approximation, ReLU, SiLU."""

_F32 = torch.float32
_local = threading.local()  # per-thread scratch: ctypes releases the GIL during a call


def _native() -> tuple[ctypes.CDLL, Limits] | None:
    """The loaded library and its limits, or ``None`` when there is none."""
    lib = library()
    return None if lib is None else (lib, read_limits(lib))


def limits() -> Limits | None:
    """The loaded library's limits (building it if need be), or ``None`` when there is none."""
    native = _native()
    return None if native is None else native[1]


def _plain(t: Tensor) -> bool:
    """float32 on the CPU with no gradient to track."""
    return t.dtype is _F32 and t.is_cpu and not (t.requires_grad and torch.is_grad_enabled())


def _few_rows(x: Tensor, max_rows: int) -> int:
    """How many rows ``x`` has over its last axis if a row op takes it (plain, at most
    ``max_rows``), else 0."""
    d = x.shape[-1]
    n_rows = x.numel() // d if d else 0
    return n_rows if 0 < n_rows <= max_rows and _plain(x) else 0


def _scratch(numel: int) -> Tensor:
    buffer = getattr(_local, "scratch", None)
    if buffer is None or buffer.numel() < numel:
        buffer = _local.scratch = torch.empty(max(numel, 1 << 16), dtype=_F32)
    return buffer


def matmul(
    x: Float[Tensor, "... d_in"],
    weight: Float[Tensor, "d_in d_out"],
    bias: Float[Tensor, " d_out"] | None = None,
    threads: int | None = None,
) -> Float[Tensor, "... d_out"] | None:
    """``x @ weight + bias`` for a few rows of ``x``, or ``None`` where the kernel does not apply.

    Args:
        x: At most the library's ``max_rows`` rows in all; rows may be strided, the last axis
            contiguous.
        weight: Contiguous ``[d_in, d_out]``.
        bias: Optional ``[d_out]``.
        threads: OpenMP threads; default torch's count (one for weights under the library's
            ``single_thread_bytes``, 256 KB).
    """
    native = _native()
    if native is None:
        return None
    lib, lim = native
    d_in = x.shape[-1]
    n_rows = x.numel() // d_in if d_in else 0
    if not 0 < n_rows <= lim.max_rows or weight.dim() != 2 or weight.shape[0] != d_in:
        return None
    if not (_plain(x) and _plain(weight) and weight.is_contiguous()):
        return None
    if bias is not None and not (
        _plain(bias) and bias.is_contiguous() and bias.shape == weight.shape[1:]
    ):
        return None
    d_out = weight.shape[1]
    rows, row_stride = _rows(x, n_rows)
    if threads is None:
        threads = 1 if d_in * d_out * 4 < lim.single_thread_bytes else torch.get_num_threads()
    out = torch.empty((*x.shape[:-1], d_out), dtype=_F32)
    scratch = None
    if threads > 1:
        floats = lib.kvlens_matmul_scratch(n_rows, d_out, threads)
        scratch = _scratch(floats).data_ptr() if floats else None
    lib.kvlens_matmul_small(
        n_rows,
        d_in,
        d_out,
        rows.data_ptr(),
        row_stride,
        weight.data_ptr(),
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
        scratch,
        threads,
    )
    return out


def rms_norm(
    x: Float[Tensor, "... d"], weight: Float[Tensor, " d"] | None, eps: float
) -> Float[Tensor, "... d"] | None:
    """``x / sqrt(mean(x**2) + eps) * weight`` over the last axis, or ``None`` (not handled)."""
    native = _native()
    if native is None:
        return None
    lib, lim = native
    d, n_rows = x.shape[-1], _few_rows(x, lim.max_rows)
    if not n_rows:
        return None
    if weight is not None and not (
        _plain(weight) and weight.is_contiguous() and weight.shape == x.shape[-1:]
    ):
        return None
    rows, row_stride = _rows(x, n_rows)
    out = torch.empty(x.shape, dtype=_F32)
    w = None if weight is None else weight.data_ptr()
    lib.kvlens_rms_norm(n_rows, d, rows.data_ptr(), row_stride, w, eps, out.data_ptr())
    return out


def layer_norm(
    x: Float[Tensor, "... d"], weight: Float[Tensor, " d"], bias: Float[Tensor, " d"], eps: float
) -> Float[Tensor, "... d"] | None:
    """``F.layer_norm`` over the last axis with its scale and bias, or ``None`` (not handled)."""
    native = _native()
    if native is None:
        return None
    lib, lim = native
    d, n_rows = x.shape[-1], _few_rows(x, lim.max_rows)
    if not n_rows:
        return None
    for t in (weight, bias):
        if not (_plain(t) and t.is_contiguous() and t.shape == x.shape[-1:]):
            return None
    rows, row_stride = _rows(x, n_rows)
    out = torch.empty(x.shape, dtype=_F32)
    lib.kvlens_layer_norm(
        n_rows, d, rows.data_ptr(), row_stride, weight.data_ptr(), bias.data_ptr(), eps,
        out.data_ptr(),
    )  # fmt: skip
    return out


def activation(x: Float[Tensor, "... d"], name: str) -> Float[Tensor, "... d"] | None:
    """The plain MLP's activation ``name`` (a ``cfg.act_fn``) of ``x``, or ``None``."""
    native = _native()
    if native is None:
        return None
    lib, lim = native
    kind = ACTIVATIONS.get(name)
    d, n_rows = x.shape[-1], _few_rows(x, lim.max_rows)
    if kind is None or not n_rows or x.stride(-1) != 1:
        return None
    rows, row_stride = _rows(x, n_rows)
    out = torch.empty(x.shape, dtype=_F32)
    lib.kvlens_activation(n_rows, d, rows.data_ptr(), row_stride, out.data_ptr(), kind)
    return out


def rotary_(
    x: Float[Tensor, "batch pos head d_head"],
    cos: Float[Tensor, "batch pos 1 rotary_half"],
    sin: Float[Tensor, "batch pos 1 rotary_half"],
    adjacent_pairs: bool = False,
) -> Float[Tensor, "batch pos head d_head"] | None:
    """Rotate ``x`` in place as :func:`kvlens.components.positions.apply_rotary` would.

    Returns ``x``, or ``None`` (``x`` untouched) where the kernel does not apply. ``x`` must be a
    tensor nobody else reads (a fresh projection): its values are overwritten.
    """
    native = _native()
    if native is None:
        return None
    lib, lim = native
    batch, n_new, heads, d_head = x.shape
    half = cos.shape[-1]
    if batch * n_new > lim.max_rows or 2 * half > d_head or x.stride(-1) != 1:
        return None
    if x.stride(0) != n_new * x.stride(1) or cos.dim() != 4 or cos.shape[1] != n_new:
        return None
    if cos.shape != sin.shape or cos.stride() != sin.stride() or cos.stride(-1) != 1:
        return None
    if cos.shape[0] not in (1, batch) or not (_plain(x) and _plain(cos) and _plain(sin)):
        return None
    # Rows (b, p) of x are x.stride(1) apart; give cos and sin the same row layout.
    if cos.shape[0] == 1 and n_new == 1:
        cos_row = 0  # one row of angles for every batch row
    else:
        if cos.shape[0] != batch or cos.stride(0) != n_new * cos.stride(1):
            cos = cos.expand(batch, -1, -1, -1).contiguous()
            sin = sin.expand(batch, -1, -1, -1).contiguous()
        cos_row = cos.stride(1)
    lib.kvlens_rotary_inplace(
        batch * n_new,
        heads,
        half,
        x.data_ptr(),
        x.stride(1),
        x.stride(2),
        cos.data_ptr(),
        sin.data_ptr(),
        cos_row,
        int(adjacent_pairs),
    )
    return x


def _rows(x: Tensor, n_rows: int) -> tuple[Tensor, int]:
    """``x`` as ``n_rows`` rows with a contiguous last axis, and their stride.

    A view when the rows are evenly spaced (a slice of a wider output), else a copy: the caller
    holds the returned tensor until its native call returns.
    """
    if x.is_contiguous():
        return x, x.shape[-1]
    if x.stride(-1) != 1:
        x = x.contiguous()
        return x, x.shape[-1]
    rows = x.reshape(n_rows, x.shape[-1])
    return rows, rows.stride(0)


def silu_mul(
    gate: Float[Tensor, "... d_mlp"], up: Float[Tensor, "... d_mlp"]
) -> Float[Tensor, "... d_mlp"] | None:
    """``silu(gate) * up`` (the gated MLP's activation), or ``None`` where not handled.

    ``gate`` and ``up`` may be views of one projection's output (rows strided).
    """
    native = _native()
    if native is None:
        return None
    lib, lim = native
    d = gate.shape[-1]
    n_rows = gate.numel() // d if d else 0
    if not 0 < n_rows <= lim.max_rows or up.shape != gate.shape:
        return None
    if gate.stride(-1) != 1 or up.stride(-1) != 1 or not (_plain(gate) and _plain(up)):
        return None
    (g, ldg), (u, ldu) = _rows(gate, n_rows), _rows(up, n_rows)
    out = torch.empty(gate.shape, dtype=_F32)
    lib.kvlens_silu_mul(n_rows, d, g.data_ptr(), ldg, u.data_ptr(), ldu, out.data_ptr())
    return out


def decode_attention(
    q: Float[Tensor, "batch head_index 1 d_head"],
    k: Float[Tensor, "batch kv_head kv_pos d_head"],
    v: Float[Tensor, "batch kv_head kv_pos d_head"],
    mask: Tensor | None = None,
    threads: int | None = None,
    *,
    scale: float,
) -> Float[Tensor, "batch head_index 1 d_head"] | None:
    """Softmax attention of one query per row over keys and values read in place, or ``None``.

    Args:
        q: Queries (any strides with a contiguous last axis).
        k: Keys, e.g. views of the cache's storage; query head ``h`` reads key head
            ``h // (n_heads / n_kv)`` (at most the library's ``attention_max_group`` query heads
            per key head, 8, and ``d_head`` at most its ``attention_max_d_head``, 256).
        v: Values, with the shape and strides of ``k``.
        mask: Bool ``[batch, 1, 1, kv_pos]``, True where the query may attend; a row with no
            allowed key gets zeros.
        threads: OpenMP threads; default torch's count.
        scale: What the scores are multiplied by (the layer's rule,
            :class:`kvlens.components.attention_rules.AttentionSpec`).

    Returns a view of a contiguous ``[batch, 1, head_index, d_head]`` tensor, so transposing it
    back (as the attention layer does) costs nothing.
    """
    result = _decode_attention(q, k, v, mask, threads, scale, with_lse=False)
    return None if result is None else result[0]


def decode_attention_lse(
    q: Float[Tensor, "batch head_index 1 d_head"],
    k: Float[Tensor, "batch kv_head kv_pos d_head"],
    v: Float[Tensor, "batch kv_head kv_pos d_head"],
    mask: Tensor | None = None,
    threads: int | None = None,
    *,
    scale: float,
) -> tuple[Float[Tensor, "batch head_index 1 d_head"], Float[Tensor, "batch head_index 1"]] | None:
    """:func:`decode_attention` and the log-sum-exp of each query's scaled scores, or ``None``.

    The log-sum-exp (``-inf`` where no key is allowed) lets a caller merge this result with
    attention over other keys exactly (cascade attention over a shared prefix).
    """
    result = _decode_attention(q, k, v, mask, threads, scale, with_lse=True)
    if result is None or result[1] is None:
        return None
    return result[0], result[1]


def _decode_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    threads: int | None,
    scale: float,
    with_lse: bool,
) -> tuple[Tensor, Tensor | None] | None:
    native = _native()
    if native is None:
        return None
    lib, lim = native
    batch, n_heads, n_new, d_head = q.shape
    if n_new != 1 or k.dim() != 4 or k.shape != v.shape or k.stride() != v.stride():
        return None
    n_kv, kv_len = k.shape[1], k.shape[2]
    if k.shape[0] != batch or k.shape[3] != d_head or kv_len == 0 or n_heads % n_kv:
        return None
    if n_heads // n_kv > lim.attention_max_group or d_head > lim.attention_max_d_head:
        return None
    if q.stride(-1) != 1 or k.stride(-1) != 1 or not (_plain(q) and _plain(k) and _plain(v)):
        return None
    if mask is not None and (
        mask.dtype is not torch.bool
        or tuple(mask.shape) != (batch, 1, 1, kv_len)
        or mask.stride(-1) != 1
        or not mask.is_cpu
    ):
        return None
    out = torch.empty(batch, 1, n_heads, d_head, dtype=_F32)
    lse = torch.empty(batch, n_heads, 1, dtype=_F32) if with_lse else None
    scratch = _scratch(lib.kvlens_decode_attention_scratch(batch, n_heads, n_kv, d_head, kv_len))
    lib.kvlens_decode_attention(
        batch,
        n_heads,
        n_kv,
        d_head,
        kv_len,
        q.data_ptr(),
        q.stride(0),
        q.stride(1),
        k.data_ptr(),
        v.data_ptr(),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        None if mask is None else mask.data_ptr(),
        0 if mask is None else mask.stride(0),
        scale,
        out.data_ptr(),
        None if lse is None else lse.data_ptr(),
        scratch.data_ptr(),
        threads or torch.get_num_threads(),
    )
    return out.transpose(1, 2), lse
