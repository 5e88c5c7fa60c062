"""Next-token cross-entropy with and without a padding mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvlens.loss import lm_cross_entropy_loss


def test_matches_cross_entropy_of_shifted_tokens() -> None:
    torch.manual_seed(0)
    logits, tokens = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), tokens[:, 1:].reshape(-1))
    assert torch.allclose(lm_cross_entropy_loss(logits, tokens), expected)
    per_token = lm_cross_entropy_loss(logits, tokens, per_token=True)
    assert per_token.shape == (2, 4) and torch.allclose(per_token.mean(), expected)


def test_mask_drops_predictions_from_or_of_padding() -> None:
    torch.manual_seed(1)
    logits, tokens = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    per_token = F.cross_entropy(
        logits[:, :-1].reshape(-1, 11), tokens[:, 1:].reshape(-1), reduction="none"
    ).view(2, 4)
    keep = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]]).bool()  # row 1: pad->pad, pad->real dropped
    expected = per_token[keep].mean()
    assert torch.allclose(lm_cross_entropy_loss(logits, tokens, mask), expected)
    masked = lm_cross_entropy_loss(logits, tokens, mask, per_token=True)
    assert torch.equal(masked[1, :2], torch.zeros(2))
