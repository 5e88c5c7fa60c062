"""What every layer's attention needs about one forward pass, computed once by the model."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


@dataclass(frozen=True)
class AttentionContext:
    """Masks and rotary angles of one forward pass, shared by every layer.

    Attributes:
        attn_mask: ``[batch, 1, pos, kv_pos]``, True where a query may attend to a key; ``None``
            when every query may attend to every key (one new token, no padding) or when
            ``is_causal`` says the mask is plain causal.
        is_causal: The keys are exactly the new tokens (no cache, no padding) and attention is
            plain causal, which ``scaled_dot_product_attention`` handles without a mask tensor.
        rotary_cos: ``[batch, pos, 1, rotary_dim / 2]`` for the new tokens (rotary models only).
        rotary_sin: Same shape as ``rotary_cos``.
    """

    attn_mask: Bool[Tensor, "batch 1 pos kv_pos"] | None = None
    is_causal: bool = False
    rotary_cos: Float[Tensor, "batch pos 1 rotary_half"] | None = None
    rotary_sin: Float[Tensor, "batch pos 1 rotary_half"] | None = None

    def to(self, device: torch.device) -> AttentionContext:
        """The same context with its tensors on ``device`` (for blocks on other devices)."""

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return replace(
            self,
            attn_mask=move(self.attn_mask),
            rotary_cos=move(self.rotary_cos),
            rotary_sin=move(self.rotary_sin),
        )


def causal_mask(
    n_new: int, kv_len: int, device: torch.device | str | None = None
) -> Bool[Tensor, "pos kv_pos"]:
    """Query ``i``, the ``(kv_len - n_new + i)``-th token, may see keys up to its own index."""
    return torch.ones(n_new, kv_len, dtype=torch.bool, device=device).tril(kv_len - n_new)


def build_attention_context(
    n_new: int,
    kv_len: int,
    full_mask: Int[Tensor, "batch kv_pos"] | None,
    has_padding: bool,
    device: torch.device,
    rotary: tuple[Tensor, Tensor] | None = None,
) -> AttentionContext:
    """Choose the cheapest mask that is right for this pass.

    Args:
        n_new: Tokens in this pass (queries).
        kv_len: Keys attended to: cached plus new.
        full_mask: The attention mask over the cached and the new tokens (1 real, 0 padding), or
            ``None`` when there is no padding anywhere.
        has_padding: Whether ``full_mask`` has any 0 (decided once per forward by the caller).
        device: Where the mask is built.
        rotary: ``(cos, sin)`` for the new tokens, for rotary models.

    Returns:
        A context whose mask lets query ``i`` see key ``j`` iff ``j`` is not after it and is not
        padding. A query always sees itself, so a pad query has a well-defined output (the
        eager and the fast path then agree; TransformerLens gives a pad query an all-zero pattern).
    """
    cos, sin = rotary if rotary is not None else (None, None)
    if not has_padding:
        if n_new == 1:
            return AttentionContext(None, False, cos, sin)
        if kv_len == n_new:
            return AttentionContext(None, True, cos, sin)
        mask = causal_mask(n_new, kv_len, device)[None, None]
        return AttentionContext(mask, False, cos, sin)
    if full_mask is None:
        raise ValueError("has_padding is True but no full_mask was given")
    causal = causal_mask(n_new, kv_len, device)
    query_index = torch.arange(kv_len - n_new, kv_len, device=device)
    itself = query_index[:, None] == torch.arange(kv_len, device=device)[None, :]
    keys = full_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
    mask = (causal & keys) | itself
    return AttentionContext(mask, False, cos, sin)
