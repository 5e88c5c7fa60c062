"""Build a ``transformers.LlamaConfig`` from the architecture fields of a GGUF file."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import LlamaConfig

# GGUF architectures whose tensors and fields follow llama.cpp's "llama" layout. llama.cpp also
# converts dense Mistral checkpoints (v0.x) to "llama"; gguf-py has no separate "mistral".
SUPPORTED_ARCHITECTURES = ("llama",)


def architecture_of(fields: Mapping[str, Any]) -> str:
    """``general.architecture``, checked against :data:`SUPPORTED_ARCHITECTURES`.

    Raises:
        ValueError: The field is missing or names an unsupported architecture.
    """
    arch = fields.get("general.architecture")
    if arch is None:
        raise ValueError("GGUF file has no 'general.architecture' field")
    if arch not in SUPPORTED_ARCHITECTURES:
        supported = list(SUPPORTED_ARCHITECTURES)
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: {supported}")
    return str(arch)


def _required(fields: Mapping[str, Any], key: str) -> Any:
    if key not in fields:
        raise ValueError(f"GGUF file has no {key!r} field, which a llama model needs")
    return fields[key]


def _one_int(fields: Mapping[str, Any], key: str, default: int | None = None) -> int:
    """An integer field; a per-layer list is accepted when all layers agree."""
    value = _required(fields, key) if default is None else fields.get(key, default)
    if isinstance(value, list):
        if not value or len(set(value)) != 1:
            raise ValueError(
                f"GGUF field {key!r} varies across layers ({value}); expected one value"
            )
        value = value[0]
    return int(value)


def _rope_scaling(fields: Mapping[str, Any], arch: str) -> dict[str, Any] | None:
    kind = fields.get(f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(fields[f"{arch}.rope.scaling.factor"])}
    raise ValueError(f"GGUF rope scaling type {kind!r} is not supported; supported: none, linear")


def llama_config(
    fields: Mapping[str, Any], tensor_shapes: Mapping[str, tuple[int, ...]]
) -> LlamaConfig:
    """The Hugging Face config equivalent to a llama-architecture GGUF file.

    Args:
        fields: All GGUF fields (see ``_gguf_fields.read_fields``).
        tensor_shapes: GGUF name to (row-major) shape of each stored tensor; they decide tying,
            biases and, when ``{arch}.vocab_size`` is absent, the vocabulary size.

    Raises:
        ValueError: A required field is missing or a feature is not supported.
    """
    from transformers import LlamaConfig

    arch = architecture_of(fields)
    if "rope_freqs.weight" in tensor_shapes:
        raise ValueError(
            "GGUF tensor 'rope_freqs.weight' (per-dimension rope frequency factors, as in "
            "Llama 3.1+) is not supported"
        )
    n_heads = _one_int(fields, f"{arch}.attention.head_count")
    hidden = _one_int(fields, f"{arch}.embedding_length")
    head_dim = _one_int(fields, f"{arch}.attention.key_length", hidden // n_heads)
    rope_dim = _one_int(fields, f"{arch}.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise ValueError(
            f"GGUF {arch}.rope.dimension_count is {rope_dim}, expected the head size {head_dim} "
            "(partial rotary embeddings are not supported)"
        )
    embed_shape = tensor_shapes.get("token_embd.weight")
    vocab_default = embed_shape[0] if embed_shape else None
    eps = float(_required(fields, f"{arch}.attention.layer_norm_rms_epsilon"))
    return LlamaConfig(
        vocab_size=_one_int(fields, f"{arch}.vocab_size", vocab_default),
        hidden_size=hidden,
        intermediate_size=_one_int(fields, f"{arch}.feed_forward_length"),
        num_hidden_layers=_one_int(fields, f"{arch}.block_count"),
        num_attention_heads=n_heads,
        num_key_value_heads=_one_int(fields, f"{arch}.attention.head_count_kv", n_heads),
        head_dim=head_dim,
        max_position_embeddings=_one_int(fields, f"{arch}.context_length"),
        rms_norm_eps=eps,
        rope_theta=float(fields.get(f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(fields, arch),
        attention_bias="blk.0.attn_q.bias" in tensor_shapes,
        mlp_bias="blk.0.ffn_up.bias" in tensor_shapes,
        tie_word_embeddings="output.weight" not in tensor_shapes,
        bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=fields.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=fields.get("tokenizer.ggml.padding_token_id"),
        hidden_act="silu",
        architectures=["LlamaForCausalLM"],
    )
