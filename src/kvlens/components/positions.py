"""Positional information: learned absolute embeddings and rotary embeddings.

Positions are per token (``[batch, pos]``) so that left padding can be skipped: a pad token
consumes no position, and the first real token of every row sits at position 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from kvlens.config import ModelConfig
from kvlens.structure import WatchedModule


def positions_from_mask(
    attention_mask: Int[Tensor, "batch kv_pos"], n_new: int
) -> Int[Tensor, "batch pos"]:
    """Positions of the last ``n_new`` tokens: how many real tokens precede each one.

    Args:
        attention_mask: 1 for real tokens, 0 for padding, over the cached and the new tokens.
        n_new: How many of the mask's last columns are the new tokens.
    """
    counts = attention_mask.cumsum(dim=-1)
    return (counts[:, counts.shape[1] - n_new :] - 1).clamp(min=0)


class PosEmbed(WatchedModule):
    """Learned absolute position embeddings (GPT-2).

    Attributes:
        W_pos: ``[n_ctx, d_model]``.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.W_pos = nn.Parameter(torch.empty(cfg.n_ctx, cfg.d_model, dtype=cfg.dtype))

    def forward(
        self,
        positions: Int[Tensor, "batch pos"],
        new_mask: Int[Tensor, "batch pos"] | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """Embeddings of ``positions``; zero at padding tokens when ``new_mask`` is given.

        Zeroing pad tokens' position embeddings matches TransformerLens; it changes nothing a
        real token sees, since no real token attends to a pad token.
        """
        pos_embed = F.embedding(positions, self.W_pos)
        if new_mask is not None:
            pos_embed = pos_embed * new_mask.unsqueeze(-1).to(pos_embed.dtype)
        return pos_embed


def rotary_inverse_frequencies(rotary_dim: int, base: float) -> Float[Tensor, " rotary_half"]:
    """``base ** (-2i / rotary_dim)`` for ``i < rotary_dim / 2``, computed as HF computes it."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    return 1.0 / (base**exponents)


class RotaryEmbedding(WatchedModule):
    """Cosine and sine tables of rotary position embedding, shared by every layer.

    The tables are non-persistent buffers ``[n_ctx, rotary_dim / 2]`` in ``cfg.dtype``, computed
    in float32 and then rounded, as HF does before applying them. One table serves all layers
    (TransformerLens keeps one per layer).
    """

    rotary_cos: Tensor
    rotary_sin: Tensor

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.rotary_dim = cfg.rotary_dim_resolved
        self.adjacent_pairs = cfg.rotary_adjacent_pairs
        inv_freq = rotary_inverse_frequencies(self.rotary_dim, cfg.rotary_base)
        angles = torch.arange(cfg.n_ctx, dtype=torch.float32)[:, None] * inv_freq[None, :]
        self.register_buffer("rotary_cos", angles.cos().to(cfg.dtype), persistent=False)
        self.register_buffer("rotary_sin", angles.sin().to(cfg.dtype), persistent=False)

    def forward(
        self, positions: Int[Tensor, "batch pos"]
    ) -> tuple[Float[Tensor, "batch pos 1 rotary_half"], Float[Tensor, "batch pos 1 rotary_half"]]:
        """Cosines and sines of ``positions``, to broadcast over ``[batch, pos, head, _]``."""
        cos = F.embedding(positions, self.rotary_cos).unsqueeze(2)
        sin = F.embedding(positions, self.rotary_sin).unsqueeze(2)
        return cos, sin


def apply_rotary(
    x: Float[Tensor, "batch pos head d_head"],
    cos: Float[Tensor, "batch pos 1 rotary_half"],
    sin: Float[Tensor, "batch pos 1 rotary_half"],
    adjacent_pairs: bool = False,
) -> Float[Tensor, "batch pos head d_head"]:
    """Rotate the first ``rotary_dim = 2 * cos.shape[-1]`` dimensions of every head.

    Each pair ``(a, b)`` becomes ``(a cos - b sin, b cos + a sin)``. With ``adjacent_pairs`` the
    pairs are ``(0, 1), (2, 3), ...`` (GPT-J); otherwise ``(i, i + rotary_dim / 2)`` (GPT-NeoX,
    Llama: HF's ``rotate_half``). Dimensions past ``rotary_dim`` pass through unchanged.
    """
    half = cos.shape[-1]
    rotary_dim = 2 * half
    if rotary_dim > x.shape[-1]:
        raise ValueError(f"cos/sin rotate {rotary_dim} dimensions, x has only {x.shape[-1]}")
    if adjacent_pairs:
        a, b = x[..., 0:rotary_dim:2], x[..., 1:rotary_dim:2]
    else:
        a, b = x[..., :half], x[..., half:rotary_dim]
    rot_a = a * cos - b * sin
    rot_b = b * cos + a * sin
    if adjacent_pairs:
        rotated = torch.stack((rot_a, rot_b), dim=-1).flatten(-2)
    else:
        rotated = torch.cat((rot_a, rot_b), dim=-1)
    if rotary_dim == x.shape[-1]:
        return rotated
    return torch.cat((rotated, x[..., rotary_dim:]), dim=-1)
