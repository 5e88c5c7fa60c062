"""Read a llama GGUF file into kvlens's state dict, keeping Q4_0, Q4_1 and Q8_0 matrices as blocks.

:func:`quantized_state_dict` gives the state dict that
``HookedTransformer.from_pretrained_no_processing(path).state_dict()`` holds, with the same names
and values, except that a matrix stored as Q4_0, Q4_1 or Q8_0 stays a
:class:`~kvlens.quantized.QuantizedMatrix` (its exact dequantization is the fp32 parameter).
The conversion is the fp32 path's (``_gguf_tensors`` to Hugging Face names and layout, then
``hf_weights.convert_llama_like``), done on block rows: llama.cpp's rotary interleaving of q/k is
a permutation of output rows, fusing q/k/v or gate/up concatenates output rows, and a block row is
an output row, so nothing is dequantized. Every other tensor is dequantized as the fp32 path does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from kvlens.config import ModelConfig
from kvlens.kernels.quantized import QUANT_TYPES
from kvlens.loading._gguf_config import llama_config
from kvlens.loading._gguf_fields import open_gguf, read_fields, scalar_fields
from kvlens.loading._gguf_tensors import (
    check_tensors,
    hf_name,
    hf_tensor,
    rotary_heads,
    tensor_shape,
    unpermute_rotary,
)
from kvlens.loading.hf import config_from_hf
from kvlens.loading.tokenizer import tokenizer_from_gguf
from kvlens.quantized import QuantizedMatrix

if TYPE_CHECKING:
    from gguf.gguf_reader import ReaderTensor
    from transformers import LlamaConfig, PreTrainedTokenizerFast

__all__ = ["QuantizedGGUF", "QuantizedStateDict", "quantized_state_dict", "read_quantized_gguf"]

QuantizedStateDict = dict[str, Tensor | QuantizedMatrix]
"""kvlens parameter names to fp32 tensors (kvlens layout) or block matrices ``[d_out, d_in]``."""

# The config fields that decide which tensors a llama state dict holds and their shapes.
_SHAPE_FIELDS = (
    "original_architecture",
    "n_layers",
    "d_model",
    "n_heads",
    "d_head",
    "d_vocab",
    "d_mlp",
    "n_key_value_heads",
    "attn_qkv_bias",
    "attn_out_bias",
    "mlp_bias",
)


def quantized_state_dict(
    path: str | Path, cfg: ModelConfig | None = None
) -> tuple[QuantizedStateDict, list[str]]:
    """kvlens's state dict of a llama GGUF file, with its Q4_0/Q4_1/Q8_0 matrices as blocks.

    Names and values are those of ``from_pretrained_no_processing(path).state_dict()``; the
    orientation of a :class:`QuantizedMatrix` is its blocks' ``[d_out, d_in]``:

    - ``blocks.{i}.attn.W_QKV`` ``[q | k | v rows, d_model]``, ``blocks.{i}.attn.W_O_flat``,
      ``blocks.{i}.mlp.W_gate_in`` ``[gate | up rows, d_model]``, ``blocks.{i}.mlp.W_out`` and
      ``unembed.W_U`` ``[d_vocab, d_model]``: the transpose of kvlens's ``[in, out]`` parameter
      (``qm.dequantize().T`` equals it).
    - ``embed.W_E`` ``[d_vocab, d_model]``: kvlens's own orientation (``qm.dequantize()`` equals
      it); a token's embedding is one block row, ``qm.dequantize(token, token + 1)``.

    With tied embeddings (no ``output.weight``), ``unembed.W_U`` is the very object
    ``embed.W_E`` is when that is a :class:`QuantizedMatrix` (one copy of the blocks, two
    views of it by the rules above); a dense embedding gives a dense ``W_U = W_E.T`` as the
    fp32 path does.

    A fused matrix keeps its blocks only when all its parts share one block format; otherwise its
    parts are dequantized (and listed). Norms, biases and matrices of other types (F32, F16,
    K-quants...) are fp32 tensors in kvlens's layout, in ``cfg.dtype``.

    Args:
        path: The ``.gguf`` file.
        cfg: The model's config, checked against the file's; default the file's own (fp32), as
            ``config_from_hf`` makes it from the file's metadata.

    Returns:
        The state dict, and ``"gguf_name (TYPE)"`` for each matrix of the file that was
        dequantized although it is a matrix (in file order; empty when every matrix is Q4_0,
        Q4_1 or Q8_0 and each fused matrix's parts share a format).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: The file is not a llama GGUF file whose tensors fit its metadata, or ``cfg``
            disagrees with the file on a field that decides a shape.
    """
    read = read_quantized_gguf(path, cfg)
    return read.state_dict, read.dense_matrices


@dataclass(frozen=True)
class QuantizedGGUF:
    """A llama GGUF file read for a quantized model.

    Attributes:
        hf_config: Its architecture, as ``kvlens.loading.gguf.read_gguf`` gives it.
        state_dict: kvlens's state dict with block matrices (:func:`quantized_state_dict`).
        dense_matrices: The file's matrices that were dequantized (``"name (TYPE)"``).
        tokenizer: The file's tokenizer.
        metadata: Its scalar fields.
    """

    hf_config: LlamaConfig
    state_dict: QuantizedStateDict = field(repr=False)
    dense_matrices: list[str]
    tokenizer: PreTrainedTokenizerFast = field(repr=False)
    metadata: dict[str, Any] = field(repr=False)


def read_quantized_gguf(path: str | Path, cfg: ModelConfig | None = None) -> QuantizedGGUF:
    """Everything a quantized model needs from a llama GGUF file (see
    :func:`quantized_state_dict` for the state dict, ``cfg`` and the errors)."""
    path = Path(path)
    reader = open_gguf(path)
    fields = read_fields(reader, path)
    shapes = {tensor.name: tensor_shape(tensor) for tensor in reader.tensors}
    hf_config = llama_config(fields, shapes)
    check_tensors(shapes, hf_config)
    own = config_from_hf(hf_config, dtype=torch.float32 if cfg is None else cfg.dtype)
    if cfg is not None:
        _check_fits(cfg, own, path)
    source = _Source(reader.tensors, hf_config, own.dtype)
    state = _convert(own, source)
    return QuantizedGGUF(
        hf_config, state, source.dense_matrices(), tokenizer_from_gguf(fields),
        scalar_fields(fields),
    )  # fmt: skip


def _check_fits(cfg: ModelConfig, own: ModelConfig, path: Path) -> None:
    for name in _SHAPE_FIELDS:
        if getattr(cfg, name) != getattr(own, name):
            raise ValueError(
                f"cfg.{name} is {getattr(cfg, name)!r}, but {path.name} holds a model with "
                f"{name}={getattr(own, name)!r}"
            )


class _Source:
    """The file's tensors by HF name: as blocks (q/k rows restored) or dequantized (as the fp32
    path reads them), recording which matrices were dequantized."""

    def __init__(
        self, tensors: list[ReaderTensor], config: LlamaConfig, dtype: torch.dtype
    ) -> None:
        self.tensors = {hf_name(tensor.name): tensor for tensor in tensors}
        self.order = [tensor.name for tensor in tensors]
        self.config = config
        self.dtype = dtype
        self.dequantized: set[str] = set()

    def fmt(self, name: str) -> str | None:
        """The block format ``name`` is kept in, or ``None`` (a vector, or another type)."""
        tensor = self.tensors[name]
        fmt = tensor.tensor_type.name.lower()
        return fmt if fmt in QUANT_TYPES and len(tensor_shape(tensor)) == 2 else None

    def blocks(self, name: str) -> Tensor:
        """``uint8 [d_out, row_bytes]`` of a kept matrix, in HF row order."""
        tensor = self.tensors[name]
        blocks = torch.from_numpy(np.array(tensor.data, dtype=np.uint8))  # a copy off the map
        heads = rotary_heads(name, self.config)
        return blocks if heads is None else unpermute_rotary(blocks, heads)

    def dense(self, name: str) -> Tensor:
        """The dequantized tensor in HF layout and ``dtype``, as the fp32 path reads it."""
        tensor = self.tensors[name]
        if len(tensor_shape(tensor)) == 2:
            self.dequantized.add(tensor.name)
        return hf_tensor(tensor, self.config)[1].to(self.dtype)

    def matrix(self, *names: str) -> Tensor | QuantizedMatrix:
        """HF matrices ``[out, in]`` fused along ``out``: blocks ``[d_out, d_in]`` when all are
        kept in one format, else kvlens's dense ``[in, out]``."""
        formats = {self.fmt(name) for name in names}
        if len(formats) == 1 and None not in formats:
            (fmt,) = formats
            d_in = tensor_shape(self.tensors[names[0]])[1]
            parts = [self.blocks(name) for name in names]
            # numpy's copy: torch's thread pool makes small byte copies slow on few cores
            fused = parts[0] if len(parts) == 1 else np.concatenate([p.numpy() for p in parts])
            return QuantizedMatrix(torch.as_tensor(fused), d_in, str(fmt))
        return torch.cat([self.dense(name) for name in names]).T.contiguous()

    def vector(self, *names: str) -> Tensor:
        return torch.cat([self.dense(name) for name in names])

    def dense_matrices(self) -> list[str]:
        return [
            f"{name} ({self.tensors[hf_name(name)].tensor_type.name})"
            for name in self.order
            if name in self.dequantized
        ]


def _convert(cfg: ModelConfig, source: _Source) -> QuantizedStateDict:
    """kvlens's names, as ``hf_weights.convert_llama_like`` assigns them."""
    embed_name = "model.embed_tokens.weight"
    embed: Tensor | QuantizedMatrix = (
        source.matrix(embed_name) if source.fmt(embed_name) else source.dense(embed_name)
    )
    out: QuantizedStateDict = {"embed.W_E": embed}
    for i in range(cfg.n_layers):
        h, b = f"model.layers.{i}.", f"blocks.{i}."
        out[b + "ln1.w"] = source.vector(h + "input_layernorm.weight")
        out[b + "ln2.w"] = source.vector(h + "post_attention_layernorm.weight")
        qkv = [f"{h}self_attn.{x}_proj" for x in "qkv"]
        out[b + "attn.W_QKV"] = source.matrix(*(f"{p}.weight" for p in qkv))
        if cfg.attn_qkv_bias:
            out[b + "attn.b_QKV"] = source.vector(*(f"{p}.bias" for p in qkv))
        out[b + "attn.W_O_flat"] = source.matrix(h + "self_attn.o_proj.weight")
        if cfg.attn_out_bias:
            out[b + "attn.b_O"] = source.vector(h + "self_attn.o_proj.bias")
        gate_up = [f"{h}mlp.{x}_proj" for x in ("gate", "up")]
        out[b + "mlp.W_gate_in"] = source.matrix(*(f"{p}.weight" for p in gate_up))
        out[b + "mlp.W_out"] = source.matrix(h + "mlp.down_proj.weight")
        if cfg.mlp_bias:
            out[b + "mlp.b_gate_in"] = source.vector(*(f"{p}.bias" for p in gate_up))
            out[b + "mlp.b_out"] = source.vector(h + "mlp.down_proj.bias")
    out["ln_final.w"] = source.vector("model.norm.weight")
    if "lm_head.weight" in source.tensors:
        out["unembed.W_U"] = source.matrix("lm_head.weight")
    else:  # tied: the embedding's blocks serve as both, or W_E.T as the fp32 path copies it
        out["unembed.W_U"] = embed if isinstance(embed, QuantizedMatrix) else embed.T.contiguous()
    return out
