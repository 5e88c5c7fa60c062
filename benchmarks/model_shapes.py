"""The model shapes the generation benchmark runs, as ``kvlens.ModelConfig`` field values.

Plain data (no kvlens import): the orchestrator hands a shape to each worker as JSON, and the
peers' worker, which runs in another virtual environment, translates the same fields into a
TransformerLens or Hugging Face config. One table, so every system builds the same architecture.
"""

from __future__ import annotations

from typing import Any

# n_ctx is 8,192 for both: SmolLM2's own value, and for GPT-2 small (1,024 in the released model)
# enough room for a 1,024-token prompt plus 128 new tokens and for the 4,096-token sweep.
SHAPES: dict[str, dict[str, Any]] = {
    "gpt2-small": {
        "n_layers": 12,
        "d_model": 768,
        "n_heads": 12,
        "d_head": 64,
        "n_ctx": 8192,
        "d_vocab": 50257,
        "d_mlp": 3072,
        "n_key_value_heads": None,
        "act_fn": "gelu_new",
        "normalization_type": "LN",
        "eps": 1e-5,
        "positional_embedding_type": "standard",
        "rotary_base": 10000.0,
        "gated_mlp": False,
        "attn_qkv_bias": True,
        "attn_out_bias": True,
        "mlp_bias": True,
        "final_norm": True,
    },
    "smollm2-135m": {
        "n_layers": 30,
        "d_model": 576,
        "n_heads": 9,
        "d_head": 64,
        "n_ctx": 8192,
        "d_vocab": 49152,
        "d_mlp": 1536,
        "n_key_value_heads": 3,
        "act_fn": "silu",
        "normalization_type": "RMS",
        "eps": 1e-5,
        "positional_embedding_type": "rotary",
        "rotary_base": 100000.0,
        "gated_mlp": True,
        "attn_qkv_bias": False,
        "attn_out_bias": False,
        "mlp_bias": False,
        "final_norm": True,
    },
}

TITLES = {
    "gpt2-small": "GPT-2 small (12 layers, d_model 768, 12 heads)",
    "smollm2-135m": "SmolLM2-135M (30 layers, d_model 576, 9 heads, 3 kv heads)",
}


def n_kv_heads(shape: dict[str, Any]) -> int:
    """Key/value heads stored in the cache."""
    return shape["n_key_value_heads"] or shape["n_heads"]
