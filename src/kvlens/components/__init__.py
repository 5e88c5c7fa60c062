"""Building blocks of the hooked transformer, one class (or one set of pure functions) per file."""

from kvlens.components.attention import Attention
from kvlens.components.attention_context import AttentionContext, build_attention_context
from kvlens.components.block import TransformerBlock
from kvlens.components.embed import Embed
from kvlens.components.mlp import MLP, GatedMLP, make_mlp
from kvlens.components.norm import LayerNorm, RMSNorm, make_norm
from kvlens.components.positions import PosEmbed, RotaryEmbedding, apply_rotary
from kvlens.components.unembed import Unembed

__all__ = [
    "MLP",
    "Attention",
    "AttentionContext",
    "Embed",
    "GatedMLP",
    "LayerNorm",
    "PosEmbed",
    "RMSNorm",
    "RotaryEmbedding",
    "TransformerBlock",
    "Unembed",
    "apply_rotary",
    "build_attention_context",
    "make_mlp",
    "make_norm",
]
