"""Dequantize the tensors of a llama GGUF file into a Hugging Face Llama state dict."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from gguf import GGUFReader
    from gguf.gguf_reader import ReaderTensor
    from transformers import LlamaConfig

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_name(gguf_name: str) -> str:
    """The Hugging Face Llama name of a llama.cpp tensor name.

    Raises:
        ValueError: The name is not one of llama.cpp's llama tensors.
    """
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        raise ValueError(
            f"GGUF tensor {gguf_name!r} is not a llama tensor; expected token_embd, output_norm, "
            f"output or blk.N.{{{', '.join(_LAYER_NAMES)}}}"
        )
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a file for ``config`` must hold, by Hugging Face name, with its shape."""
    d_model, d_mlp, d_head = config.hidden_size, config.intermediate_size, config.head_dim
    q_rows = config.num_attention_heads * d_head
    kv_rows = config.num_key_value_heads * d_head
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, d_model),
        "model.norm.weight": (d_model,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, d_model)
    layer: dict[str, tuple[int, ...]] = {
        "input_layernorm.weight": (d_model,),
        "self_attn.q_proj.weight": (q_rows, d_model),
        "self_attn.k_proj.weight": (kv_rows, d_model),
        "self_attn.v_proj.weight": (kv_rows, d_model),
        "self_attn.o_proj.weight": (d_model, q_rows),
        "post_attention_layernorm.weight": (d_model,),
        "mlp.gate_proj.weight": (d_mlp, d_model),
        "mlp.up_proj.weight": (d_mlp, d_model),
        "mlp.down_proj.weight": (d_model, d_mlp),
    }
    if config.attention_bias:
        attn_biases = {"q_proj": q_rows, "k_proj": kv_rows, "v_proj": kv_rows, "o_proj": d_model}
        layer.update({f"self_attn.{k}.bias": (rows,) for k, rows in attn_biases.items()})
    if config.mlp_bias:
        mlp_biases = {"gate_proj": d_mlp, "up_proj": d_mlp, "down_proj": d_model}
        layer.update({f"mlp.{k}.bias": (rows,) for k, rows in mlp_biases.items()})
    for i in range(config.num_hidden_layers):
        shapes.update({f"model.layers.{i}.{name}": shape for name, shape in layer.items()})
    return shapes


def tensor_shape(tensor: ReaderTensor) -> tuple[int, ...]:
    """Row-major (PyTorch) shape of a GGUF tensor; GGUF lists dimensions fastest first."""
    return tuple(int(n) for n in reversed(tensor.shape.tolist()))


def check_tensors(gguf_shapes: Mapping[str, tuple[int, ...]], config: LlamaConfig) -> None:
    """Check that the file holds exactly the tensors ``config`` needs, with their shapes.

    Raises:
        ValueError: A tensor is unknown, missing, or has the wrong shape.
    """
    expected = expected_shapes(config)
    found = {hf_name(name): (name, shape) for name, shape in gguf_shapes.items()}
    missing = sorted(set(expected) - set(found))
    if missing:
        raise ValueError(f"GGUF file lacks {len(missing)} tensor(s) a llama model needs: {missing}")
    extra = sorted(gguf for hf, (gguf, _) in found.items() if hf not in expected)
    if extra:
        raise ValueError(f"GGUF file has tensors beyond its metadata's layer count: {extra}")
    for hf, (gguf, shape) in found.items():
        if shape != expected[hf]:
            raise ValueError(
                f"GGUF tensor {gguf!r} has shape {shape}, expected {expected[hf]} from the metadata"
            )


def unpermute_rotary(weight: Tensor, n_heads: int) -> Tensor:
    """Undo llama.cpp's reordering of q/k projection rows (or biases).

    llama.cpp rotates adjacent pairs ``(2i, 2i + 1)`` of each head; Hugging Face Llama rotates
    ``(i, i + d_head / 2)``. Its converter therefore stores, per head, row ``i`` of the first
    half at ``2i`` and row ``i`` of the second half at ``2i + 1``. This de-interleaves them.
    """
    rows = weight.shape[0]
    half = rows // n_heads // 2
    per_head = weight.reshape(n_heads, half, 2, *weight.shape[1:])
    return per_head.transpose(1, 2).reshape(weight.shape)


def _dequantize(tensor: ReaderTensor, shape: tuple[int, ...]) -> Tensor:
    from gguf.quants import dequantize

    try:
        array = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as error:
        raise ValueError(
            f"GGUF tensor {tensor.name!r} is stored as {tensor.tensor_type.name}, which the "
            f"installed gguf package cannot dequantize"
        ) from error
    if array.dtype != np.float32 or not array.flags.writeable:
        array = np.array(array, dtype=np.float32)  # F32 comes back as a read-only memory map
    return torch.from_numpy(array.reshape(shape))


def iter_state_dict(
    reader: GGUFReader, config: LlamaConfig, dtype: torch.dtype, progress: bool
) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(hf_name, tensor)`` for every stored tensor, dequantized and in HF layout."""
    from tqdm.auto import tqdm

    bar = tqdm(reader.tensors, desc="Dequantizing GGUF", unit="tensor", disable=not progress)
    for tensor in bar:
        name, weight = hf_tensor(tensor, config)
        yield name, weight.to(dtype)


def rotary_heads(name: str, config: LlamaConfig) -> int | None:
    """The heads whose rows llama.cpp interleaved in the HF tensor ``name`` (q/k weights and
    biases, see :func:`unpermute_rotary`), or ``None`` for any other tensor."""
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    return heads.get(name.rsplit(".", 2)[-2])


def hf_tensor(tensor: ReaderTensor, config: LlamaConfig) -> tuple[str, Tensor]:
    """``(hf_name, weight)`` of one stored tensor: dequantized to fp32, in HF layout."""
    name = hf_name(tensor.name)
    weight = _dequantize(tensor, tensor_shape(tensor))
    heads = rotary_heads(name, config)
    return name, weight if heads is None else unpermute_rotary(weight, heads)
