"""Attention of many rows over one shared prefix and their own suffixes, with TL's hook shapes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from kvlens.cache.shared import SharedPrefixEntry
from kvlens.components.attention_context import AttentionContext, build_attention_context
from kvlens.components.attention_math import attention_pattern, attention_scores, mix_values
from kvlens.components.cascade import cascade_attention, mix_prefix_values, prefix_scores
from kvlens.hooks import HookPoint


@dataclass(frozen=True)
class SharedPrefixContext(AttentionContext):
    """An :class:`AttentionContext` whose keys are a shared prefix followed by each row's suffix.

    ``attn_mask`` and ``is_causal`` describe the suffix part only (``[batch, 1, pos,
    suffix_pos]``); every query may see every real prefix token.

    Attributes:
        prefix_mask: ``[1, 1, 1, prefix_pos]``, True at the prefix's real tokens; ``None`` when the
            prefix has no padding.
    """

    prefix_mask: Bool[Tensor, "1 1 1 prefix_pos"] | None = None

    def to(self, device: torch.device) -> SharedPrefixContext:
        moved = super().to(device)
        mask = None if self.prefix_mask is None else self.prefix_mask.to(device)
        return SharedPrefixContext(
            moved.attn_mask, moved.is_causal, moved.rotary_cos, moved.rotary_sin, mask
        )


def build_shared_prefix_context(
    n_new: int,
    suffix_len: int,
    suffix_mask: Int[Tensor, "batch suffix_pos"] | None,
    has_padding: bool,
    device: torch.device,
    rotary: tuple[Tensor, Tensor] | None,
    prefix_mask: Bool[Tensor, "1 1 1 prefix_pos"] | None,
) -> SharedPrefixContext:
    """The suffix part's mask as :func:`build_attention_context` chooses it, and the prefix's."""
    suffix = build_attention_context(n_new, suffix_len, suffix_mask, has_padding, device, rotary)
    prefix = None if prefix_mask is None else prefix_mask.to(device)
    return SharedPrefixContext(
        suffix.attn_mask, suffix.is_causal, suffix.rotary_cos, suffix.rotary_sin, prefix
    )


def shared_prefix_attention(
    q: Float[Tensor, "batch pos head_index d_head"],
    k: Float[Tensor, "batch pos kv_head d_head"],
    v: Float[Tensor, "batch pos kv_head d_head"],
    ctx: AttentionContext,
    entry: SharedPrefixEntry,
    hook_attn_scores: HookPoint,
    hook_pattern: HookPoint,
) -> Float[Tensor, "batch head_index pos d_head"]:
    """Append ``k``, ``v`` to the rows' suffixes and attend over the prefix and the suffixes.

    With no hook on the scores or the pattern, this is :func:`cascade_attention`, reading the
    prefix once for all rows. With one, the scores and pattern of every row over the prefix and
    its suffix, ``[batch, head_index, pos, prefix_pos + suffix_pos]`` as TransformerLens's, are
    built and hooked; the prefix is still never copied.
    """
    if not isinstance(ctx, SharedPrefixContext):
        raise TypeError(
            f"a shared-prefix cache entry needs a SharedPrefixContext, got {type(ctx).__name__}"
        )
    suffix_k, suffix_v = (t.transpose(1, 2) for t in entry.append(k, v))
    prefix_k, prefix_v = entry.prefix_keys, entry.prefix_values
    q_heads = q.transpose(1, 2)
    if not (hook_attn_scores.has_hooks or hook_pattern.has_hooks):
        return cascade_attention(
            q_heads,
            prefix_k,
            prefix_v,
            ctx.prefix_mask,
            suffix_k,
            suffix_v,
            ctx.attn_mask,
            ctx.is_causal,
        )
    scores = torch.cat(
        (
            prefix_scores(q_heads, prefix_k, ctx.prefix_mask),
            attention_scores(q_heads, suffix_k, ctx.attn_mask, ctx.is_causal),
        ),
        dim=-1,
    )
    pattern = hook_pattern(attention_pattern(hook_attn_scores(scores)))
    n_prefix = prefix_k.shape[2]
    return mix_prefix_values(pattern[..., :n_prefix], prefix_v) + mix_values(
        pattern[..., n_prefix:], suffix_v
    )
