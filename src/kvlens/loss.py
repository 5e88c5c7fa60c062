"""Next-token cross-entropy, as TransformerLens's ``lm_cross_entropy_loss``."""

from __future__ import annotations

from jaxtyping import Float, Int
from torch import Tensor


def lm_cross_entropy_loss(
    logits: Float[Tensor, "batch pos d_vocab"],
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    per_token: bool = False,
) -> Float[Tensor, ""] | Float[Tensor, "batch pos_minus_1"]:
    """Cross-entropy of predicting ``tokens[:, 1:]`` from ``logits[:, :-1]`` (in float32).

    Args:
        logits: The model's logits for ``tokens``.
        tokens: The tokens that were run.
        attention_mask: 1 for real tokens, 0 for padding. A prediction counts only when both the
            token it is made at and the token it predicts are real.
        per_token: Return the loss of every prediction (0 where masked) instead of the mean.
    """
    log_probs = logits[:, :-1].float().log_softmax(dim=-1)
    predicted = log_probs.gather(-1, tokens[:, 1:, None].to(log_probs.device))[..., 0]
    if attention_mask is None:
        return -predicted if per_token else -predicted.mean()
    keep = attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool()
    predicted = predicted * keep.to(predicted.device)
    if per_token:
        return -predicted
    return -predicted.sum() / keep.sum().clamp(min=1)
