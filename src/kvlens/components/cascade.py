"""Attention over one shared prefix and per-row suffixes, merged by log-sum-exp (cascade attention).

N rows continue the same prefix. Their keys split into the prefix's ``P`` keys, stored once
(``[1, kv_head, P, d_head]``), and each row's own ``S`` suffix keys (``[batch, kv_head, S,
d_head]``). Softmax attention over the union is recovered exactly from attention over each part:
if part ``i`` gives the normalised output ``o_i`` and the log-sum-exp ``l_i`` of its scores, then

    out = (exp(l_p) * o_p + exp(l_s) * o_s) / (exp(l_p) + exp(l_s))

(Hydragen; FlashInfer's cascade attention). The prefix part folds the rows and the query heads
that share a key head into the query axis, so all N rows read the single prefix copy in one
batched product and no per-row copy of the prefix is ever made.

Shapes: queries ``[batch, head_index, pos, d_head]``; masks are boolean, True where a query may
attend to a key: ``prefix_mask`` ``[1, 1, 1, prefix_pos]`` (the prefix's padding; the same for
every query) and ``suffix_mask`` ``[batch, 1, pos, suffix_pos]``.
"""

from __future__ import annotations

import functools

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from kvlens import kernels
from kvlens.components.attention_rules import (
    AttentionSpec,
    causal_mask,
    default_scale,
    fold_heads,
    fold_rows,
    unfold_heads,
    unfold_rows,
)

Partial = tuple[Float[Tensor, "batch head_index pos d_head"], Float[Tensor, "batch head_index pos"]]


def cascade_attention(
    q: Float[Tensor, "batch head_index pos d_head"],
    prefix_k: Float[Tensor, "1 kv_head prefix_pos d_head"],
    prefix_v: Float[Tensor, "1 kv_head prefix_pos d_head"],
    prefix_mask: Bool[Tensor, "1 1 1 prefix_pos"] | None,
    suffix_k: Float[Tensor, "batch kv_head suffix_pos d_head"],
    suffix_v: Float[Tensor, "batch kv_head suffix_pos d_head"],
    suffix_mask: Bool[Tensor, "batch 1 pos suffix_pos"] | None,
    suffix_is_causal: bool,
    scale: float | None = None,
) -> Float[Tensor, "batch head_index pos d_head"]:
    """Softmax attention over the shared prefix and each row's suffix, without copying the prefix.

    Equal, up to float rounding, to attention over the keys ``prefix ++ suffix`` of every row.
    A query that may attend to no key at all gets zeros (as :func:`attention_pattern` gives).
    ``scale`` multiplies the scores (default ``1 / sqrt(d_head)``); ``prefix_mask`` may also be
    ``[1, 1, pos, prefix_pos]`` (a sliding window ending inside the prefix).
    """
    scale = default_scale(q.shape[-1]) if scale is None else scale
    out_p, lse_p = prefix_attention(q, prefix_k, prefix_v, prefix_mask, scale)
    out_s, lse_s = suffix_attention(q, suffix_k, suffix_v, suffix_mask, suffix_is_causal, scale)
    return merge_partials(out_p, lse_p, out_s, lse_s).to(q.dtype)


def prefix_attention(
    q: Float[Tensor, "batch head_index pos d_head"],
    k: Float[Tensor, "1 kv_head prefix_pos d_head"],
    v: Float[Tensor, "1 kv_head prefix_pos d_head"],
    mask: Bool[Tensor, "1 1 pos prefix_pos"] | None,
    scale: float | None = None,
) -> Partial:
    """Every row's queries against the one prefix, as one product per key head.

    Returns the normalised output and the log-sum-exp of the scores (``-inf`` where no key is
    allowed).
    """
    batch, n_heads = q.shape[:2]
    scale = default_scale(q.shape[-1]) if scale is None else scale
    folded = fold_rows(q, k.shape[1])
    if mask is not None and mask.shape[2] > 1:
        # One mask row per query: repeat it for the rows and heads folded into the query axis.
        mask = mask[0, 0].repeat(batch * (n_heads // k.shape[1]), 1)[None, None]
    out, lse = _partial(folded, k, v, mask, False, scale)
    return unfold_rows(out, q.shape), unfold_rows(lse, q.shape[:3])


def suffix_attention(
    q: Float[Tensor, "batch head_index pos d_head"],
    k: Float[Tensor, "batch kv_head suffix_pos d_head"],
    v: Float[Tensor, "batch kv_head suffix_pos d_head"],
    mask: Bool[Tensor, "batch 1 pos suffix_pos"] | None,
    is_causal: bool,
    scale: float | None = None,
) -> Partial:
    """Each row's queries against its own suffix keys: normalised output and log-sum-exp.

    For one new token this is kvlens's native decode kernel when it is built
    (:func:`kvlens.kernels.decode_attention_lse`); otherwise the query heads sharing a key head
    are folded into the query axis (their mask row is the same): fewer, larger problems than one
    per query head, as in ``attention_math.fused_attention``.
    """
    _, n_heads, n_new, d_head = q.shape
    n_kv = k.shape[1]
    scale = default_scale(d_head) if scale is None else scale
    if n_new == 1 and not is_causal:
        native = kernels.decode_attention_lse(q, k, v, mask, scale=scale)
        if native is not None:
            return native
    if n_new > 1 or is_causal or n_kv == n_heads:
        return _partial(q, k, v, mask, is_causal, scale)
    out, lse = _partial(fold_heads(q, n_kv), k, v, mask, False, scale)
    return unfold_heads(out, n_heads), unfold_heads(lse, n_heads)


def merge_partials(
    out_a: Float[Tensor, "batch head_index pos d_head"],
    lse_a: Float[Tensor, "batch head_index pos"],
    out_b: Float[Tensor, "batch head_index pos d_head"],
    lse_b: Float[Tensor, "batch head_index pos"],
) -> Float[Tensor, "batch head_index pos d_head"]:
    """Combine two attention results over disjoint key sets into the one over their union.

    Computed in float32. Each weight is ``exp(lse - max)``, so nothing overflows; where both
    parts are empty (both ``lse`` are ``-inf``) the result is zero.
    """
    lse_a, lse_b = lse_a.float(), lse_b.float()
    top = torch.maximum(lse_a, lse_b)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    w_a = torch.exp(lse_a - top).unsqueeze(-1)
    w_b = torch.exp(lse_b - top).unsqueeze(-1)
    total = (w_a + w_b).clamp_min(torch.finfo(torch.float32).tiny)
    return (w_a * out_a.float() + w_b * out_b.float()) / total


# Eager pieces, for when score or pattern hooks need the whole [batch, head, pos, kv_pos] tensor.


def prefix_scores(
    q: Float[Tensor, "batch head_index pos d_head"],
    k: Float[Tensor, "1 kv_head prefix_pos d_head"],
    mask: Bool[Tensor, "1 1 pos prefix_pos"] | None,
    spec: AttentionSpec | None = None,
) -> Float[Tensor, "batch head_index pos prefix_pos"]:
    """The layer's scores of every row's queries against the shared prefix, ``-inf`` if masked.

    ``spec`` gives the scale and soft-capping (default: ``1 / sqrt(d_head)``, no cap).
    """
    if spec is None:
        spec = AttentionSpec.default(q.shape[1], k.shape[1], q.shape[3])
    folded = fold_rows(q, k.shape[1])
    # The folded queries are one row of kv_head heads, each of group 1: the spec's rules apply.
    scores = spec.cap((folded @ k.transpose(-1, -2)) * spec.scale)
    scores = unfold_rows(scores, (*q.shape[:3], k.shape[2]))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores


def mix_prefix_values(
    pattern: Float[Tensor, "batch head_index pos prefix_pos"],
    v: Float[Tensor, "1 kv_head prefix_pos d_head"],
) -> Float[Tensor, "batch head_index pos d_head"]:
    """The pattern-weighted sum of the shared prefix's values for every row and query head."""
    batch, n_heads, n_new, _ = pattern.shape
    folded = fold_rows(pattern, v.shape[1]) @ v
    return unfold_rows(folded, (batch, n_heads, n_new, v.shape[3]))


# Internals -----------------------------------------------------------------------------------


def _partial(
    q: Float[Tensor, "batch head_index pos d_head"],
    k: Float[Tensor, "batch kv_head kv_pos d_head"],
    v: Float[Tensor, "batch kv_head kv_pos d_head"],
    mask: Bool[Tensor, "batch 1 pos kv_pos"] | None,
    is_causal: bool,
    scale: float,
) -> Partial:
    """Normalised attention output and log-sum-exp of the scores (``-inf`` for empty rows)."""
    if _use_fused(q, k, v):
        bias = None
        if mask is not None:
            bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device)
            bias.masked_fill_(~mask, float("-inf"))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, is_causal=is_causal, attn_mask=bias, scale=scale
        )
        if mask is not None:
            # The kernel reports 0, not -inf, for a query with no allowed key.
            lse = lse.masked_fill(~mask.any(-1), float("-inf"))
        return out, lse
    return _partial_eager(q, k, v, mask, is_causal, scale)


def _partial_eager(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, scale: float
) -> Partial:
    """Reference for :func:`_partial` with matmuls: any device, and differentiable."""
    n_heads, n_new = q.shape[1], q.shape[2]
    n_kv, kv_len = k.shape[1], k.shape[2]
    scores = unfold_heads(fold_heads(q, n_kv) @ k.transpose(-1, -2), n_heads) * scale
    if mask is None and is_causal:
        mask = causal_mask(n_new, kv_len, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    scores = scores.float()
    lse = torch.logsumexp(scores, dim=-1)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    pattern = torch.exp(scores - safe.unsqueeze(-1)).to(v.dtype)
    return unfold_heads(fold_heads(pattern, n_kv) @ v, n_heads), lse


def _use_fused(*tensors: Tensor) -> bool:
    """The CPU flash kernel returns the log-sum-exp; its backward ignores it, so not under grad."""
    if tensors[0].device.type != "cpu" or not _flash_kernel_available():
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


@functools.cache
def _flash_kernel_available() -> bool:
    """Whether this torch's CPU flash kernel takes a mask and grouped-query keys (checked once)."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        return False
    q, kv = torch.zeros(1, 2, 1, 4), torch.zeros(1, 1, 2, 4)
    try:
        op(q, kv, kv, attn_mask=torch.zeros(1, 1, 1, 2))
    except (RuntimeError, TypeError):
        return False
    return True
