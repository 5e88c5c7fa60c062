"""Rotary and learned position embeddings, and positions from a padding mask."""

from __future__ import annotations

import pytest
import torch

from kvlens.components.positions import (
    PosEmbed,
    RotaryEmbedding,
    apply_rotary,
    positions_from_mask,
)
from kvlens.config import ModelConfig


def rotary_cfg(**changes) -> ModelConfig:
    base = ModelConfig(
        n_layers=1,
        d_model=16,
        n_heads=2,
        d_head=8,
        n_ctx=32,
        d_vocab=10,
        positional_embedding_type="rotary",
    )
    return base.replace(**changes)


def complex_reference(
    x: torch.Tensor, positions: torch.Tensor, rotary_dim: int, base: float, adjacent: bool
) -> torch.Tensor:
    """Rotary as complex multiplication, in float64: pair (a, b) -> (a + ib) e^{i pos theta}."""
    x = x.double()
    half = rotary_dim // 2
    theta = base ** (-torch.arange(half, dtype=torch.float64) * 2 / rotary_dim)
    angle = positions.double()[..., None, None] * theta  # [batch, pos, 1, half]
    if adjacent:
        a, b = x[..., 0:rotary_dim:2], x[..., 1:rotary_dim:2]
    else:
        a, b = x[..., :half], x[..., half:rotary_dim]
    z = torch.complex(a, b) * torch.exp(1j * angle)
    out = x.clone()
    if adjacent:
        out[..., 0:rotary_dim:2], out[..., 1:rotary_dim:2] = z.real, z.imag
    else:
        out[..., :half], out[..., half:rotary_dim] = z.real, z.imag
    return out


@pytest.mark.parametrize("adjacent", [False, True])
@pytest.mark.parametrize("rotary_dim", [8, 4])
def test_apply_rotary_matches_complex_reference(adjacent: bool, rotary_dim: int) -> None:
    cfg = rotary_cfg(rotary_dim=rotary_dim, rotary_adjacent_pairs=adjacent, rotary_base=100.0)
    table = RotaryEmbedding(cfg)
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 8)
    positions = torch.tensor([[0, 1, 2, 3, 4], [0, 0, 0, 7, 30]])
    cos, sin = table(positions)
    got = apply_rotary(x, cos, sin, adjacent_pairs=adjacent)
    expected = complex_reference(x, positions, rotary_dim, 100.0, adjacent)
    assert torch.allclose(got.double(), expected, atol=1e-5)
    assert torch.equal(got[..., rotary_dim:], x[..., rotary_dim:])  # partial rotary passes through


def test_rotary_scores_depend_only_on_relative_position() -> None:
    table = RotaryEmbedding(rotary_cfg())
    torch.manual_seed(1)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(q_pos: int, k_pos: int) -> torch.Tensor:
        rq = apply_rotary(q, *table(torch.tensor([[q_pos]])))
        rk = apply_rotary(k, *table(torch.tensor([[k_pos]])))
        return (rq * rk).sum()

    assert torch.allclose(score(5, 2), score(13, 10), atol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 4), atol=1e-3)


def test_apply_rotary_rejects_too_many_dimensions() -> None:
    cos = sin = torch.ones(1, 1, 1, 8)
    with pytest.raises(ValueError, match="rotate 16 dimensions"):
        apply_rotary(torch.randn(1, 1, 1, 8), cos, sin)


def test_positions_from_mask_skip_padding() -> None:
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 0, 1, 0]])
    assert positions_from_mask(mask, 3).tolist() == [[2, 3, 4], [0, 1, 2], [1, 2, 2]]


def test_pos_embed_zeroes_pad_tokens() -> None:
    pos_embed = PosEmbed(rotary_cfg(positional_embedding_type="standard"))
    torch.nn.init.normal_(pos_embed.W_pos)
    positions = torch.tensor([[0, 0, 1]])
    out = pos_embed(positions, torch.tensor([[0, 1, 1]]))
    assert torch.equal(out[0, 0], torch.zeros(16))
    assert torch.equal(out[0, 1:], pos_embed.W_pos[[0, 1]])
