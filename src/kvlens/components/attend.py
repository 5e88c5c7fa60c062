"""The one entry point of attention: new queries against the keys and values an entry gives.

:func:`attend` takes the queries, the :class:`~kvlens.cache.entry.KeySet` a cache entry returned
(the rows' own keys and values, and a shared prefix's when there is one), the layer's
:class:`~kvlens.components.attention_rules.AttentionSpec` and the pass's
:class:`~kvlens.components.attention_context.AttentionContext`, and chooses how to compute:

- **eager** (scores, pattern, weighted values; :mod:`attention_math`) when a hook reads or edits
  the scores or the pattern, or the layer soft-caps its scores: the hooks see TransformerLens's
  ``[batch, head_index, pos, kv_pos]`` over every key (every key held, in a bounded cache),
  windowed-out keys masked;
- **cascade** (:mod:`cascade`) over a shared prefix: the prefix is read once for all rows;
- otherwise the native decode kernel for one new token per row (fp32 on CPU), or PyTorch's
  ``scaled_dot_product_attention``.

A decode step in a sliding-window layer reads only the window's keys. Every path takes the scale,
soft-capping, visibility and head groups from :mod:`attention_rules`.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from kvlens.cache.entry import KeySet
from kvlens.components.attention_context import AttentionContext
from kvlens.components.attention_math import (
    attention_pattern,
    fused_attention,
    masked_scores,
    mix_values,
)
from kvlens.components.attention_rules import AttentionSpec, window_start
from kvlens.components.cascade import cascade_attention, mix_prefix_values, prefix_scores
from kvlens.hooks import HookPoint


def attend(
    q: Float[Tensor, "batch head_index pos d_head"],
    keys: KeySet,
    spec: AttentionSpec,
    ctx: AttentionContext,
    hook_attn_scores: HookPoint,
    hook_pattern: HookPoint,
) -> Float[Tensor, "batch head_index pos d_head"]:
    """Softmax attention of ``q`` over ``keys`` by the layer's rules; the heads' outputs."""
    if hook_attn_scores.has_hooks or hook_pattern.has_hooks or spec.softcap is not None:
        return _eager(q, keys, spec, ctx, hook_attn_scores, hook_pattern)
    own_k, own_v, held_from = keys.keys, keys.values, keys.start
    prefix_k, prefix_v = keys.prefix_keys, keys.prefix_values
    if q.shape[2] == 1:
        # One query per row: only the window's keys are read, and within the window the query
        # sees every real key, so only padding masks it.
        begin = window_start(ctx.total_len, spec.window)  # a cache index, the prefix's first
        skip = max(0, begin - ctx.prefix_len - held_from)
        mask, _ = ctx.own_mask(None)
        own_k, own_v = own_k[:, :, skip:], own_v[:, :, skip:]
        mask = None if mask is None else mask[..., held_from + skip :]
        if prefix_k is None or prefix_v is None or begin >= ctx.prefix_len:
            return fused_attention(q, own_k, own_v, mask, False, spec.scale)
        prefix_mask = ctx.prefix_mask(None)
        prefix_k, prefix_v = prefix_k[:, :, begin:], prefix_v[:, :, begin:]
        prefix_mask = None if prefix_mask is None else prefix_mask[..., begin:]
        return cascade_attention(
            q, prefix_k, prefix_v, prefix_mask, own_k, own_v, mask, False, spec.scale
        )
    mask, is_causal = _own_mask(ctx, spec, held_from)
    if prefix_k is None or prefix_v is None:
        return fused_attention(q, own_k, own_v, mask, is_causal, spec.scale)
    return cascade_attention(
        q, prefix_k, prefix_v, ctx.prefix_mask(spec.window), own_k, own_v, mask, is_causal,
        spec.scale,
    )  # fmt: skip


def _own_mask(
    ctx: AttentionContext, spec: AttentionSpec, held_from: int
) -> tuple[Tensor | None, bool]:
    """The mask over the own keys held (from own position ``held_from``) and ``is_causal``."""
    mask, is_causal = ctx.own_mask(spec.window)
    if held_from and mask is not None:
        mask = mask[..., held_from:]
    return mask, is_causal


def _eager(
    q: Float[Tensor, "batch head_index pos d_head"],
    keys: KeySet,
    spec: AttentionSpec,
    ctx: AttentionContext,
    hook_attn_scores: HookPoint,
    hook_pattern: HookPoint,
) -> Float[Tensor, "batch head_index pos d_head"]:
    """Scores and pattern over every key held (a shared prefix's first), through their hooks."""
    mask, is_causal = _own_mask(ctx, spec, keys.start)
    scores = masked_scores(q, keys.keys, spec, mask, is_causal)
    if keys.prefix_keys is None or keys.prefix_values is None:
        pattern = hook_pattern(attention_pattern(hook_attn_scores(scores)))
        return mix_values(pattern, keys.values)
    prefix = prefix_scores(q, keys.prefix_keys, ctx.prefix_mask(spec.window), spec)
    scores = torch.cat((prefix, scores), dim=-1)
    pattern = hook_pattern(attention_pattern(hook_attn_scores(scores)))
    n_prefix = keys.prefix_keys.shape[2]
    return mix_prefix_values(pattern[..., :n_prefix], keys.prefix_values) + mix_values(
        pattern[..., n_prefix:], keys.values
    )
