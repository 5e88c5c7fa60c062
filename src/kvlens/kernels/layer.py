"""A whole decoder layer of a decode step in one native call (``layer.c``).

Op by op, a layer at batch 1 is about a dozen native and torch calls, and their
Python dispatch and thread wake-ups cost milliseconds per step (SmolLM2: 28.2 ms op by op, 25.2 ms
in one call per layer; docs/benchmarks.md). :func:`decode_layer` runs the
layer in one call with the same arithmetic, so its output is bitwise equal to the op-by-op path's
(tested). The caller (:class:`kvlens.components.block.TransformerBlock`) uses it only when no
hook is attached to the block: hooks need the activations, which this call never materializes.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, NamedTuple, Union

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from kvlens.kernels import ACTIVATIONS, _native, _plain, _scratch
from kvlens.kernels.quantized import blocks_ok

if TYPE_CHECKING:
    from kvlens.quantized import QuantizedMatrix

_F32 = torch.float32


class _Layer(ctypes.Structure):
    """``kvlens_layer`` of kernels.h, field for field (checked by :func:`layout_problem`)."""

    _fields_ = [
        *((name, ctypes.c_int64) for name in ("rows", "d_model", "n_heads", "n_kv", "d_head")),
        *((name, ctypes.c_int64) for name in ("d_mlp", "rotary_half", "pos", "s_b", "s_h")),
        *((name, ctypes.c_int64) for name in ("s_p", "ms_b", "cos_row")),
        ("eps", ctypes.c_float),
        ("scale", ctypes.c_float),
        *((name, ctypes.c_int32) for name in ("adjacent", "threads", "layer_norm", "gated")),
        *((name, ctypes.c_int32) for name in ("act", "parallel", "q_qkv", "q_o", "q_in")),
        ("q_out", ctypes.c_int32),
        *((name, ctypes.c_void_p) for name in ("x", "out", "ln1_w", "ln1_b", "b_qkv", "b_o")),
        *((name, ctypes.c_void_p) for name in ("ln2_w", "ln2_b", "b_in", "b_out", "w_qkv")),
        *((name, ctypes.c_void_p) for name in ("w_o", "w_in", "w_out", "cos", "sin", "k_cache")),
        *((name, ctypes.c_void_p) for name in ("v_cache", "mask", "work")),
    ]


def layout_problem(lib: ctypes.CDLL) -> str | None:
    """How :class:`_Layer` differs from the library's ``kvlens_layer``, or ``None`` if it does not.

    Compares the struct's size and each field's name, offset and size with what the library
    reports (limits.c); :mod:`kvlens.kernels.build` refuses a library for which this is not
    ``None``.
    """
    offset, size = ctypes.c_int64(), ctypes.c_int64()
    native: dict[str, tuple[int, int]] = {}
    while name := lib.kvlens_layer_field(len(native), ctypes.byref(offset), ctypes.byref(size)):
        native[name.decode()] = (offset.value, size.value)
    mirror: dict[str, tuple[int, int]] = {}
    for name, *_ in _Layer._fields_:
        field = getattr(_Layer, name)
        mirror[name] = (field.offset, field.size)
    if native.keys() != mirror.keys():
        return (
            f"kvlens_layer's fields {sorted(native.keys() - mirror.keys())} are only in the "
            f"library, {sorted(mirror.keys() - native.keys())} only in kvlens/kernels/layer.py"
        )
    for name, (at, width) in native.items():
        if mirror[name] != (at, width):
            return (
                f"kvlens_layer.{name} is {width} bytes at offset {at} in the library, "
                f"{mirror[name][1]} bytes at offset {mirror[name][0]} in kvlens/kernels/layer.py"
            )
    c_size = lib.kvlens_layer_size()
    if c_size != ctypes.sizeof(_Layer):
        return (
            f"kvlens_layer has {c_size} bytes in the library, "
            f"{ctypes.sizeof(_Layer)} in kvlens/kernels/layer.py"
        )
    return None


Matrix = Union[Float[Tensor, "d_in d_out"], "QuantizedMatrix"]
"""A layer's weight matrix: fp32 ``[in, out]``, or blocks ``[out, in]`` (a quantized model's)."""


def _in_out(w: Matrix) -> tuple[int, int] | None:
    """``(d_in, d_out)`` of a matrix, or ``None`` for a tensor that is not one."""
    if isinstance(w, Tensor):
        return (w.shape[0], w.shape[1]) if w.dim() == 2 else None
    d_out, d_in = w.shape
    return d_in, d_out


def _matrix(w: Matrix, d_in: int, d_out: int) -> tuple[int, int] | None:
    """``(address, kind)`` of a matrix the kernel takes as ``d_in -> d_out``: kind 0 for
    contiguous fp32 ``[d_in, d_out]``, ggml's type for blocks ``[d_out, d_in]``; else ``None``."""
    if isinstance(w, Tensor):
        return (w.data_ptr(), 0) if _fits(w, (d_in, d_out)) else None
    if w.shape != (d_out, d_in) or not blocks_ok(w.blocks, w.qtype, d_in):
        return None
    return w.blocks.data_ptr(), w.qtype


class LayerWeights(NamedTuple):
    """A layer's parameters in kvlens's layout (weights ``[in, out]``).

    ``w_in`` is the MLP's input projection: ``[d_model, 2 * d_mlp]`` (gate, then input) for a
    gated MLP, ``[d_model, d_mlp]`` for a plain one. The norms' biases are for LayerNorm. Any
    field may be ``None`` as the module holds it (the biases of a model without them); a
    required one missing makes ``decode_layer`` decline. A matrix may be a
    :class:`~kvlens.quantized.QuantizedMatrix` (``[out, in]`` blocks) instead of fp32.
    """

    ln1_w: Float[Tensor, " d_model"] | None
    ln1_b: Float[Tensor, " d_model"] | None
    w_qkv: Matrix | None
    b_qkv: Float[Tensor, " qkv"] | None
    w_o: Matrix | None
    b_o: Float[Tensor, " d_model"] | None
    ln2_w: Float[Tensor, " d_model"] | None
    ln2_b: Float[Tensor, " d_model"] | None
    w_in: Matrix | None
    b_in: Float[Tensor, " mlp_in"] | None
    w_out: Matrix | None
    b_out: Float[Tensor, " d_model"] | None


class LayerKind(NamedTuple):
    """What a layer is made of, beyond its weights' shapes."""

    layer_norm: bool  # LayerNorm (else RMSNorm)
    act: int | None  # the plain MLP's activation (ACTIVATIONS), None for a gated SiLU MLP
    parallel: bool  # attention and MLP both read the block's input (GPT-NeoX)
    eps: float  # both norms'


def _fits(t: Tensor | None, shape: tuple[int, ...], optional: bool = False) -> bool:
    """Contiguous float32 on the CPU of ``shape`` (or ``None``, when ``optional``). A weight's
    check: whether a gradient is to be tracked is asked per call (``PreparedLayer.current``)."""
    if t is None:
        return optional
    return t.dtype is _F32 and t.is_cpu and t.is_contiguous() and t.shape == shape


def _ok(t: Tensor | None, shape: tuple[int, ...], optional: bool = False) -> bool:
    """:func:`_fits`, with no gradient to track (a call's input)."""
    return _fits(t, shape, optional) and (t is None or _plain(t))


def _bias_ok(t: Tensor | None, shape: tuple[int, ...] | None) -> bool:
    """A LayerNorm bias of ``shape`` (required), or none for an RMSNorm (``shape`` None)."""
    return t is None if shape is None else _fits(t, shape)


def _address(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class PreparedLayer(NamedTuple):
    """A layer's weights checked once against what the kernel takes (:func:`prepare_layer`):
    its shapes and the weights' part of the kernel's argument. :func:`decode_layer` then checks,
    per call, only the token's inputs and that the weights are still where they were."""

    d_model: int
    n_kv: int
    d_head: int
    n_heads: int
    tensors: tuple[Tensor, ...]  # every weight tensor (a quantized matrix's blocks)
    layouts: tuple[tuple[int, tuple[int, ...], tuple[int, ...], torch.dtype], ...]
    template: bytes  # a kvlens_layer with the fields the weights fix filled in

    def current(self) -> bool:
        """The weights are as they were (address, shape, strides, dtype: a ``.data`` swap
        changes one of them) and no gradient is to be tracked through them."""
        grad = torch.is_grad_enabled()
        for t, layout in zip(self.tensors, self.layouts, strict=True):
            if _layout(t) != layout or (grad and t.requires_grad):
                return False
        return True


def _layout(t: Tensor) -> tuple[int, tuple[int, ...], tuple[int, ...], torch.dtype]:
    return t.data_ptr(), tuple(t.shape), t.stride(), t.dtype


def prepare_layer(
    weights: LayerWeights, kind: LayerKind, n_heads: int, d_head: int
) -> PreparedLayer | None:
    """The layer's weights as the kernel takes them, or ``None`` where it does not (a missing
    matrix, a shape or layout it does not handle, an unknown activation, no library)."""
    native = _native()
    if native is None:
        return None
    limits = native[1]
    w = weights
    if w.w_qkv is None or w.w_o is None or w.w_in is None or w.w_out is None:
        return None
    qkv_io, in_io, out_io = _in_out(w.w_qkv), _in_out(w.w_in), _in_out(w.w_out)
    if qkv_io is None or in_io is None or out_io is None:
        return None
    if kind.act is not None and kind.act not in ACTIVATIONS.values():
        return None
    (d_model, width), q_width = qkv_io, n_heads * d_head
    d_mlp, in_width = out_io[0], in_io[1]
    gated = kind.act is None
    n_kv, rest = divmod(width // d_head - n_heads, 2) if width % d_head == 0 else (0, 1)
    if rest or n_kv < 1 or in_width != (2 * d_mlp if gated else d_mlp):
        return None
    if n_heads % n_kv or n_heads // n_kv > limits.attention_max_group:
        return None
    if d_head > limits.attention_max_d_head:
        return None
    norm_bias = (d_model,) if kind.layer_norm else None
    if not (
        _fits(w.ln1_w, (d_model,))
        and _fits(w.ln2_w, (d_model,))
        and _bias_ok(w.ln1_b, norm_bias)
        and _bias_ok(w.ln2_b, norm_bias)
        and _fits(w.b_qkv, (width,), optional=True)
        and _fits(w.b_o, (d_model,), optional=True)
        and _fits(w.b_in, (in_width,), optional=True)
        and _fits(w.b_out, (d_model,), optional=True)
    ):
        return None
    matrices = (
        _matrix(w.w_qkv, d_model, width),
        _matrix(w.w_o, q_width, d_model),
        _matrix(w.w_in, d_model, in_width),
        _matrix(w.w_out, d_mlp, d_model),
    )
    if any(m is None for m in matrices):
        return None
    (a_qkv, q_qkv), (a_o, q_o), (a_in, q_in), (a_out, q_out) = matrices  # type: ignore[misc]
    vectors = (w.ln1_w, w.ln1_b, w.ln2_w, w.ln2_b, w.b_qkv, w.b_o, w.b_in, w.b_out)
    tensors = tuple(t for t in vectors if t is not None) + tuple(
        m if isinstance(m, Tensor) else m.blocks for m in (w.w_qkv, w.w_o, w.w_in, w.w_out)
    )
    fields: dict[str, float | int | None] = {
        "d_model": d_model, "n_heads": n_heads, "n_kv": n_kv, "d_head": d_head, "d_mlp": d_mlp,
        "eps": kind.eps, "layer_norm": int(kind.layer_norm), "parallel": int(kind.parallel),
        "gated": int(gated), "act": kind.act or 0,
        "ln1_w": _address(w.ln1_w), "ln2_w": _address(w.ln2_w),
        "ln1_b": _address(w.ln1_b), "ln2_b": _address(w.ln2_b),
        "w_qkv": a_qkv, "w_o": a_o, "w_in": a_in, "w_out": a_out,
        "q_qkv": q_qkv, "q_o": q_o, "q_in": q_in, "q_out": q_out,
        "b_qkv": _address(w.b_qkv), "b_o": _address(w.b_o),
        "b_in": _address(w.b_in), "b_out": _address(w.b_out),
    }  # fmt: skip
    template = _Layer()
    for name, value in fields.items():
        setattr(template, name, value)
    layouts = tuple(_layout(t) for t in tensors)
    return PreparedLayer(d_model, n_kv, d_head, n_heads, tensors, layouts, bytes(template))


def decode_layer(
    x: Float[Tensor, "batch 1 d_model"],
    weights: LayerWeights,
    kind: LayerKind,
    n_heads: int,
    d_head: int,
    keys: Float[Tensor, "batch kv_head capacity d_head"],
    values: Float[Tensor, "batch kv_head capacity d_head"],
    pos: int,
    mask: Bool[Tensor, "batch 1 1 kv_pos"] | None,
    rotary: tuple[Tensor, Tensor, bool] | None,
    *,
    scale: float,
    first: int = 0,
    prepared: PreparedLayer | None = None,
) -> Float[Tensor, "batch 1 d_model"] | None:
    """The residual stream after one layer, or ``None`` where this does not apply.

    Writes the new token's key and value (after rotary) into ``keys[:, :, pos]`` and
    ``values[:, :, pos]`` and attends over positions ``first..pos``; the caller commits the
    position.
    Returns ``None``, having written nothing, for input it does not take: no library, more rows
    than the library's ``max_rows``, a dtype other than float32, tensors not contiguous on the
    CPU, autograd, or an attention shape the native attention does not handle.

    Args:
        x: The residual stream entering the layer, one new token per row.
        weights: The layer's parameters.
        kind: Norm, MLP and residual kind, and the norms' epsilon.
        n_heads: Query heads; ``d_head`` their width.
        keys: The layer's key storage ``[batch, kv_head, capacity, d_head]`` (contiguous).
        values: The value storage, same shape.
        pos: Where the new key and value go (``< capacity``).
        mask: True where the new token may attend (padding), or ``None`` for all.
        rotary: ``(cos, sin, adjacent_pairs)`` with ``cos``/``sin`` ``[batch or 1, 1, 1, half]``,
            or ``None`` for a model without rotary.
        scale: What the attention scores are multiplied by (the layer's rule,
            :class:`kvlens.components.attention_rules.AttentionSpec`).
        first: The first position attended to (a sliding window's start); the keys before it
            are not read.
        prepared: :func:`prepare_layer` of these very ``weights``, ``kind``, ``n_heads`` and
            ``d_head``, made once (a block's decode plan keeps it); default: prepared here.
    """
    if prepared is None:
        prepared = prepare_layer(weights, kind, n_heads, d_head)
    if prepared is None or not prepared.current():
        return None
    native = _native()
    if native is None or x.dim() != 3 or keys.dim() != 4:
        return None
    lib, limits = native
    batch, n_new, d_model = x.shape
    n_kv, capacity = keys.shape[1], keys.shape[2]
    if n_new != 1 or not 0 < batch <= limits.max_rows or not 0 <= first <= pos < capacity:
        return None
    if (d_model, n_kv, d_head, n_heads) != prepared[:4]:
        return None
    cache_shape = (batch, n_kv, capacity, d_head)
    if not (_ok(x, (batch, 1, d_model)) and _ok(keys, cache_shape) and _ok(values, cache_shape)):
        return None
    if mask is not None and (
        mask.dtype is not torch.bool
        or tuple(mask.shape) != (batch, 1, 1, pos + 1)
        or mask.stride(-1) != 1
        or not mask.is_cpu
    ):
        return None
    layer = _Layer.from_buffer_copy(prepared.template)  # this call's own: ctypes drops the GIL
    half, cos_row = 0, 0
    if rotary is not None:
        cos, sin, adjacent = rotary
        half = cos.shape[-1]
        if 2 * half > d_head or cos.shape != sin.shape or cos.shape[1:3] != (1, 1):
            return None
        if cos.shape[0] not in (1, batch) or not (_ok(cos, cos.shape) and _ok(sin, sin.shape)):
            return None
        cos_row = half if cos.shape[0] == batch else 0
        layer.cos, layer.sin, layer.adjacent = cos.data_ptr(), sin.data_ptr(), int(adjacent)
    else:
        layer.cos = layer.sin = None
    out = torch.empty((batch, 1, d_model), dtype=_F32)
    # The kernel sees the storage from position `first` on: it writes the new key at its
    # position `pos - first` (absolute `pos`) and attends to its positions 0..pos - first.
    layer.rows, layer.rotary_half, layer.pos = batch, half, pos - first
    layer.s_b, layer.s_h, layer.s_p = keys.stride(0), keys.stride(1), keys.stride(2)
    layer.ms_b = 0 if mask is None else mask.stride(0)
    layer.cos_row, layer.scale = cos_row, scale
    layer.threads = torch.get_num_threads()
    layer.x, layer.out = x.data_ptr(), out.data_ptr()
    skip = first * keys.stride(2) * keys.element_size()
    layer.k_cache, layer.v_cache = keys.data_ptr() + skip, values.data_ptr() + skip
    layer.mask = None if mask is None else mask.data_ptr() + first * mask.stride(-1)
    address = ctypes.addressof(layer)
    work = _scratch(lib.kvlens_decode_layer_workspace(address))
    layer.work = work.data_ptr()
    lib.kvlens_decode_layer(address)
    return out
