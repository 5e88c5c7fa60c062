"""Attention as pure functions: an eager reference path and a fused fast path.

Both take queries ``[batch, head_index, pos, d_head]`` and keys/values
``[batch, kv_head, kv_pos, d_head]`` (the cache's storage layout, read without copying) and give
the same result up to float rounding. The rules (scale, soft-capping, masks, head groups) are
:mod:`kvlens.components.attention_rules`'; :func:`kvlens.components.attend.attend` chooses the path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

from kvlens import kernels
from kvlens.components.attention_rules import (
    AttentionSpec,
    causal_mask,
    default_scale,
    fold_heads,
    unfold_heads,
)


def masked_scores(
    q: Float[Tensor, "batch head_index pos d_head"],
    k: Float[Tensor, "batch kv_head kv_pos d_head"],
    spec: AttentionSpec,
    attn_mask: Bool[Tensor, "batch 1 pos kv_pos"] | None,
    is_causal: bool,
) -> Float[Tensor, "batch head_index pos kv_pos"]:
    """The layer's scores (:meth:`AttentionSpec.scores`), ``-inf`` where the mask forbids."""
    scores = spec.scores(q, k)
    if attn_mask is None and is_causal:
        attn_mask = causal_mask(q.shape[2], k.shape[2], q.device)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return scores


def attention_scores(
    q: Float[Tensor, "batch head_index pos d_head"],
    k: Float[Tensor, "batch kv_head kv_pos d_head"],
    attn_mask: Bool[Tensor, "batch 1 pos kv_pos"] | None,
    is_causal: bool,
) -> Float[Tensor, "batch head_index pos kv_pos"]:
    """:func:`masked_scores` with the default rules: scale ``1 / sqrt(d_head)``, no cap."""
    spec = AttentionSpec.default(q.shape[1], k.shape[1], q.shape[3])
    return masked_scores(q, k, spec, attn_mask, is_causal)


def attention_pattern(
    scores: Float[Tensor, "batch head_index pos kv_pos"],
) -> Float[Tensor, "batch head_index pos kv_pos"]:
    """Softmax over keys in float32, rows with no allowed key set to zero (TransformerLens)."""
    pattern = torch.softmax(scores.float(), dim=-1)
    pattern = torch.where(torch.isnan(pattern), torch.zeros_like(pattern), pattern)
    return pattern.to(scores.dtype)


def mix_values(
    pattern: Float[Tensor, "batch head_index pos kv_pos"],
    v: Float[Tensor, "batch kv_head kv_pos d_head"],
) -> Float[Tensor, "batch head_index pos d_head"]:
    """The pattern-weighted sum of values for every query head."""
    return unfold_heads(fold_heads(pattern, v.shape[1]) @ v, pattern.shape[1])


def fused_attention(
    q: Float[Tensor, "batch head_index pos d_head"],
    k: Float[Tensor, "batch kv_head kv_pos d_head"],
    v: Float[Tensor, "batch kv_head kv_pos d_head"],
    attn_mask: Bool[Tensor, "batch 1 pos kv_pos"] | None,
    is_causal: bool,
    scale: float | None = None,
) -> Float[Tensor, "batch head_index pos d_head"]:
    """``scaled_dot_product_attention`` on the keys and values in place.

    ``scale`` multiplies the scores (default ``1 / sqrt(d_head)``). For one new token under
    grouped-query attention, the query heads that share a key head are folded into the query axis
    (``[batch, kv_head, group, d_head]``): on CPU this runs about three times faster than
    ``enable_gqa=True``. On CPU in fp32 one new query per row goes to kvlens's native decode
    kernel instead (:func:`kvlens.kernels.decode_attention`) when it is built: it reads the cache
    at close to memory speed, where the fused kernel, made for many queries, does not.
    """
    _, n_heads, n_new, d_head = q.shape
    n_kv = k.shape[1]
    if scale is None:
        scale = default_scale(d_head)
    if n_new == 1 and not is_causal:
        native = kernels.decode_attention(q, k, v, attn_mask, scale=scale)
        if native is not None:
            return native
    if n_kv == n_heads:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale
        )
    if n_new == 1 and not is_causal:
        out = F.scaled_dot_product_attention(
            fold_heads(q, n_kv), k, v, attn_mask=attn_mask, scale=scale
        )
        return unfold_heads(out, n_heads)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=True, scale=scale
    )
