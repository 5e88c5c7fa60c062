"""Modules whose weight matrices may be held as ggml blocks instead of fp32 parameters.

A quantized model (``from_pretrained(..., quantized=True)`` or ``quantize="q8_0"``) replaces a
module's matrix parameter (``attn.W_QKV``, ``mlp.W_out``, ``unembed.W_U``, ``embed.W_E``, ...)
by a :class:`~kvlens.quantized.QuantizedMatrix`. The module's forward takes the stored form
from :meth:`Quantizable.stored_weight` and hands it to :func:`kvlens.components.linear.linear`,
which multiplies on the blocks; the fused native layer takes it from the module's ``native()``.

Reading the parameter's name still works: ``attn.W_QKV`` (and everything built on it, ``W_Q``,
``model.W_U``, ``OV``, ...) is the exact fp32 dequantization in kvlens's layout, made anew at
each read, as a :class:`ReadOnlyWeight`. Writing is refused with an error that says how to get
an fp32 model: assigning the attribute, and any in-place operation on the tensor read or on a
view of it. The blocks are the module's buffer ``<name>_blocks`` (so ``state_dict`` holds
them, not an fp32 copy, and ``load_state_dict`` loads them).

The quantized matrices are not parameters: ``model.parameters()`` leaves them out, and no
gradient reaches them (``requires_grad_`` on a read weight is refused too). Gradients with
respect to activations flow as in the fp32 model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kvlens import structure
from kvlens.quantized import QuantizedMatrix
from kvlens.structure import WatchedModule

__all__ = ["Quantizable", "QuantizedWeightError", "ReadOnlyWeight"]

_FP32_HINT = (
    "load an fp32 model instead (HookedTransformer.from_pretrained(name) without quantized=True "
    "or quantize=..., or `kvlens ... --no-quantized`), or call model.dequantize_() to turn "
    "every quantized weight back into an fp32 parameter"
)


class QuantizedWeightError(RuntimeError):
    """A write to a weight held as quantized blocks."""


def refuse_write(what: str) -> QuantizedWeightError:
    """The error for a write to ``what``, a weight held as blocks, saying how to get fp32."""
    return QuantizedWeightError(
        f"{what} is held as quantized blocks and cannot be written: " + _FP32_HINT
    )


# Tensor methods whose name ends in "_" that do not write the tensor's values.
_HARMLESS = {"share_memory_", "retain_grad", "detach_"}
_IN_PLACE_DUNDERS = {
    "__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
    "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__",
    "__imatmul__",
}  # fmt: skip


def _writes(func: Any, kwargs: dict[str, Any]) -> bool:
    """Whether a torch function call writes its first tensor or an ``out`` tensor: an in-place
    method (a name ending in one ``_``, an in-place operator), ``inplace=True`` (``F.relu``'s),
    or ``out=`` naming a read weight (alone or in a tuple)."""
    name = getattr(func, "__name__", "")
    if name in _IN_PLACE_DUNDERS:
        return True
    if name.endswith("_") and not name.endswith("__") and name not in _HARMLESS:
        return True
    if kwargs.get("inplace"):
        return True
    out = kwargs.get("out")
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return any(isinstance(t, ReadOnlyWeight) for t in outs)


class ReadOnlyWeight(Tensor):
    """An fp32 tensor read from quantized blocks; in-place writes to it or its views raise.

    Other operations give plain tensors (``W_U @ x``, ``W_Q * 2``, ``torch.stack``), except views
    (slicing, ``view``, ``transpose``), which stay read-only, since writing them would look
    like editing the model.
    """

    _kvlens_what: str

    @classmethod
    def of(cls, tensor: Tensor, what: str) -> ReadOnlyWeight:
        out = tensor.as_subclass(cls)
        out._kvlens_what = what
        return out

    @property  # type: ignore[override]
    def data(self) -> Tensor:
        return Tensor.data.__get__(self)  # type: ignore[attr-defined,no-any-return]

    @data.setter
    def data(self, value: Tensor) -> None:
        raise refuse_write(self._kvlens_what)

    @classmethod
    def __torch_function__(
        cls, func: Any, types: Any, args: Any = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        # The tensor a method is called on (nn.init's functions pass it by keyword).
        target = args[0] if args else next(iter(kwargs.values()), None)
        source = target if isinstance(target, ReadOnlyWeight) else None
        if _writes(func, kwargs) and (source is not None or "out" in kwargs):
            raise refuse_write(source._kvlens_what if source is not None else "a weight")
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        if isinstance(out, Tensor) and source is not None and _shares_storage(out, source):
            return ReadOnlyWeight.of(out, source._kvlens_what)
        return out


def _shares_storage(a: Tensor, b: Tensor) -> bool:
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    except RuntimeError:  # a tensor without storage
        return False


@dataclass(frozen=True)
class QuantizedWeight:
    """How a module's buffer ``<name>_blocks`` reads as its parameter ``name``.

    The parameter is the blocks' dequantization, transposed where the module's
    ``blocks_transposed`` says so (a projection: kvlens's ``[in, out]`` beside the blocks'
    ``[out, in]``; not the embedding, one block row per token). The buffer is the one place the
    blocks are held: a :class:`QuantizedMatrix` is made from it at each use, so
    ``load_state_dict`` (in place or ``assign=True``) and moves reach every product.
    """

    fmt: str
    d_in: int
    what: str


class Quantizable(WatchedModule):
    """A kvlens module whose matrix parameters may be replaced by quantized blocks."""

    _quantized: dict[str, QuantizedWeight]
    block_matrices: tuple[str, ...] = ()
    """The matrix parameters this kind of module may hold as blocks."""
    blocks_transposed = True
    """Its blocks are ``[out, in]`` of its ``[in, out]`` parameters (not so for the embedding)."""

    def __init__(self) -> None:
        super().__init__()
        self._quantized = {}

    def _matrix(self, name: str) -> QuantizedMatrix:
        held = self._quantized[name]
        blocks = self._buffers.get(f"{name}_blocks")
        if blocks is None:
            raise QuantizedWeightError(f"{held.what}: its blocks buffer {name}_blocks is gone")
        return QuantizedMatrix(blocks, held.d_in, held.fmt)

    def _read(self, name: str) -> ReadOnlyWeight:
        dense = self._matrix(name).dequantize()
        as_param = dense.T.contiguous() if self.blocks_transposed else dense
        return ReadOnlyWeight.of(as_param, self._quantized[name].what)

    def stored_weight(self, name: str) -> Tensor | QuantizedMatrix:
        """The weight as it is held: the fp32 parameter, or its :class:`QuantizedMatrix`
        (``[out, in]`` for a projection, so ``linear`` computes ``x @ W``)."""
        return self._matrix(name) if name in self._quantized else getattr(self, name)

    def weight_dtype(self, name: str) -> torch.dtype:
        """The dtype weight ``name`` reads as (float32 for blocks)."""
        return torch.float32 if name in self._quantized else getattr(self, name).dtype

    def weight_device(self, name: str) -> torch.device:
        """Where weight ``name`` is held."""
        held = self._buffers.get(f"{name}_blocks") if name in self._quantized else None
        return getattr(self, name).device if held is None else held.device

    def new_zeros(self, name: str, *size: int) -> Tensor:
        """Zeros of ``size`` with the dtype and device of weight ``name`` (without reading it)."""
        return torch.zeros(size, dtype=self.weight_dtype(name), device=self.weight_device(name))

    @property
    def quantized_weights(self) -> dict[str, QuantizedMatrix]:
        """This module's quantized matrices by parameter name (empty for an fp32 module)."""
        return {name: self._matrix(name) for name in self._quantized}

    def quantize_weight_(self, name: str, matrix: QuantizedMatrix, what: str = "") -> None:
        """Hold parameter ``name`` as ``matrix`` from now on (its fp32 parameter is dropped).

        Args:
            name: The parameter, e.g. ``"W_QKV"``.
            matrix: Blocks whose dequantization is the new weight (transposed where
                ``blocks_transposed``: ``[out, in]`` of an ``[in, out]`` parameter).
            what: The weight's name in the model, for error messages.
        """
        param = self._parameters.get(name)
        if param is None:
            raise ValueError(f"{type(self).__name__} has no fp32 parameter {name!r} to quantize")
        shape = tuple(matrix.shape[::-1]) if self.blocks_transposed else tuple(matrix.shape)
        if tuple(param.shape) != shape:
            raise ValueError(
                f"{what or name}: blocks read as {shape}, the parameter is {tuple(param.shape)}"
            )
        del self._parameters[name]
        self.register_buffer(f"{name}_blocks", matrix.blocks)
        self._quantized[name] = QuantizedWeight(matrix.fmt, matrix.d_in, what or name)
        structure.changed()

    def dequantize_weight_(self, name: str) -> None:
        """Make quantized ``name`` an fp32 parameter again (its exact dequantization)."""
        dense = self._matrix(name).dequantize()
        del self._quantized[name]
        del self._buffers[f"{name}_blocks"]
        nn.Module.__setattr__(
            self, name, nn.Parameter(dense.T.contiguous() if self.blocks_transposed else dense)
        )
        structure.changed()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name not in self.__dict__.get("_quantized", {}):
                raise
            return self._read(name)

    def __setattr__(self, name: str, value: Any) -> None:
        held = self.__dict__.get("_quantized", {}).get(name)
        if held is not None:
            raise refuse_write(held.what)
        super().__setattr__(name, value)
