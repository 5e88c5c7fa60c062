"""Tiny kvlens models with a real tokenizer, for generation, chat and CLI tests."""

from __future__ import annotations

import functools

import torch

from kvlens import ModelConfig
from kvlens.model import HookedTransformer


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer():
    """SmolLM2's tokenizer, built from the GGUF file's fields (no weights read)."""
    from kvlens.loading.gguf import default_gguf_path, read_gguf_tokenizer

    return read_gguf_tokenizer(default_gguf_path())


def tiny_llama_with_tokenizer(seed: int = 0, n_ctx: int = 256, **changes) -> HookedTransformer:
    """A 2-layer Llama-shaped model over SmolLM2's 49,152-token vocabulary, random weights.

    The unembedding is scaled up so that greedy choices are far from ties and stable under the
    rounding differences of batched and single runs.
    """
    tokenizer = smollm2_tokenizer()
    cfg = ModelConfig(
        n_layers=2,
        d_model=32,
        n_heads=4,
        d_head=8,
        n_key_value_heads=2,
        d_mlp=64,
        n_ctx=n_ctx,
        d_vocab=len(tokenizer),
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        gated_mlp=True,
        attn_qkv_bias=False,
        attn_out_bias=False,
        mlp_bias=False,
        default_prepend_bos=False,
        model_name="tiny-llama",
    ).replace(**changes)
    torch.manual_seed(seed)
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    with torch.no_grad():
        model.unembed.W_U.mul_(40.0)
    return model.eval()


def save_tiny_llama_folder(folder):  # type: ignore[no-untyped-def]
    """Write a Hugging Face checkpoint folder (config, safetensors, SmolLM2's tokenizer) of a
    tiny random Llama (2 layers, 4 heads, 2 key-value heads) into ``folder``; return it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = smollm2_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
