"""Attention's rules, in one place: the scale, soft-capping, which keys a query sees, head groups.

Every implementation (the eager path that hooks see, SDPA, the native decode kernel, the fused
native layer, cascade attention over a shared prefix) reads these rules from here:

- **Scale.** Scores are ``q . k * spec.scale``: ``1 / sqrt(d_head)``, or ``1 / cfg.attn_scale``
  (Gemma 2's ``query_pre_attn_scalar``).
- **Soft-capping.** With ``spec.softcap = c``, scores become ``c * tanh(scores / c)`` after the
  scale and before the mask (Gemma 2).
- **Visibility.** Keys are numbered by their index in the cache (prefix, then earlier tokens,
  then the new ones; padding slots count, as in Hugging Face's masks). Query ``i`` sees key
  ``j`` iff ``j <= i``, key ``j`` is real (not padding) or is the query itself, and, in a layer
  with a sliding window ``w``, ``i - j < w``.
- **Head groups.** Query head ``h`` reads key/value head ``h // (n_heads / n_kv_heads)``; the
  query heads of a group are folded into the query axis so keys are never repeated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from kvlens.config import ModelConfig


def default_scale(d_head: int) -> float:
    """The scale of a layer that sets none: ``1 / sqrt(d_head)``."""
    return float(d_head**-0.5)


@dataclass(frozen=True)
class AttentionSpec:
    """What one layer's attention computes, beyond its weights.

    Attributes:
        n_heads: Query heads.
        n_kv_heads: Key/value heads (a divisor of ``n_heads``).
        d_head: Width of a head.
        scale: What ``q . k`` is multiplied by.
        softcap: ``c`` of the soft-capping ``c * tanh(scores / c)``, or ``None``.
        window: The sliding window (keys a query sees, itself included), or ``None``.
    """

    n_heads: int
    n_kv_heads: int
    d_head: int
    scale: float
    softcap: float | None = None
    window: int | None = None

    @classmethod
    def from_config(cls, cfg: ModelConfig, layer: int) -> AttentionSpec:
        """Layer ``layer``'s attention as ``cfg`` describes it."""
        scale = default_scale(cfg.d_head) if cfg.attn_scale is None else 1.0 / cfg.attn_scale
        cap = cfg.attn_scores_soft_cap
        return cls(
            n_heads=cfg.n_heads,
            n_kv_heads=cfg.n_kv_heads,
            d_head=cfg.d_head,
            scale=scale,
            softcap=float(cap) if cap > 0 else None,
            window=cfg.layer_window(layer),
        )

    @classmethod
    def default(cls, n_heads: int, n_kv_heads: int, d_head: int) -> AttentionSpec:
        """The rules of a layer that sets none: the default scale, no cap, no window."""
        return cls(n_heads, n_kv_heads, d_head, default_scale(d_head))

    @property
    def group(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv_heads

    def scores(
        self,
        q: Float[Tensor, "batch head_index pos d_head"],
        k: Float[Tensor, "batch kv_head kv_pos d_head"],
    ) -> Float[Tensor, "batch head_index pos kv_pos"]:
        """Scaled (and soft-capped) scores of every query head against its key head, unmasked.

        ``k``'s batch may be 1 (a shared prefix) where ``q``'s is larger only through
        :func:`fold_rows`; here both have the same batch.
        """
        scores = unfold_heads(fold_heads(q, k.shape[1]) @ k.transpose(-1, -2), q.shape[1])
        return self.cap(scores * self.scale)

    def cap(self, scores: Tensor) -> Tensor:
        """Soft-capping (identity without a cap)."""
        if self.softcap is None:
            return scores
        return torch.tanh(scores / self.softcap) * self.softcap


def visible(
    n_new: int,
    kv_len: int,
    first_key: int,
    key_real: Bool[Tensor, "batch kv_pos"] | None,
    window: int | None,
    device: torch.device | str | None,
) -> Bool[Tensor, "batch 1 pos kv_pos"]:
    """Which keys each new query sees: the visibility rule above, as a mask.

    Args:
        n_new: The new tokens (queries); query ``t`` has cache index ``total - n_new + t``
            where ``total = first_key + kv_len`` is the number of keys before and up to the
            last query.
        kv_len: The keys this mask covers: cache indices ``first_key .. first_key + kv_len``.
        first_key: The cache index of the mask's first key (0, or a shared prefix's length for
            the suffix part, or where a window starts).
        key_real: ``[batch, kv_pos]`` True at real keys, or ``None`` when none is padding.
        window: The sliding window, or ``None``.
        device: Where the mask is built.

    Returns:
        ``[batch or 1, 1, n_new, kv_len]``, True where the query may attend to the key.
    """
    total = first_key + kv_len
    query_index = torch.arange(total - n_new, total, device=device)[:, None]
    key_index = torch.arange(first_key, total, device=device)[None, :]
    seen = key_index <= query_index
    if window is not None:
        seen = seen & (query_index - key_index < window)
    if key_real is None:
        return seen[None, None]
    itself = key_index == query_index
    return (seen & key_real.to(device=device, dtype=torch.bool)[:, None, None, :]) | itself


def window_start(length: int, window: int | None) -> int:
    """The first cache index one new query at index ``length - 1`` sees (0 without a window)."""
    return 0 if window is None else max(0, length - window)


def causal_mask(
    n_new: int, kv_len: int, device: torch.device | str | None = None
) -> Bool[Tensor, "pos kv_pos"]:
    """The visibility rule with no padding and no window, ``[pos, kv_pos]``."""
    return visible(n_new, kv_len, 0, None, None, device)[0, 0]


def fold_heads(x: Tensor, n_kv: int) -> Tensor:
    """``[batch, head_index, pos, w]`` to ``[batch, kv_head, group * pos, w]`` (a view when it can).

    The query heads that read one key head (``h // group``) become one longer query axis
    against it, so the keys are never repeated.
    """
    batch, n_heads, n_new, width = x.shape
    return x.reshape(batch, n_kv, (n_heads // n_kv) * n_new, width)


def unfold_heads(x: Tensor, n_heads: int) -> Tensor:
    """Invert :func:`fold_heads`: ``[batch, kv_head, group * pos, *rest]`` to
    ``[batch, head_index, pos, *rest]``."""
    batch, n_kv, folded = x.shape[:3]
    return x.reshape(batch, n_heads, folded * n_kv // n_heads, *x.shape[3:])


def fold_rows(x: Tensor, n_kv: int) -> Tensor:
    """``[batch, head_index, pos, w]`` to ``[1, kv_head, batch * group * pos, w]``.

    Query head ``h`` reads key head ``h // group``; the rows and the heads of one group become
    one long query axis against that key head (for keys shared by every row).
    """
    batch, n_heads, n_new, width = x.shape
    group = n_heads // n_kv
    per_head = x.reshape(batch, n_kv, group * n_new, width).transpose(0, 1)
    return per_head.reshape(1, n_kv, batch * group * n_new, width)


def unfold_rows(x: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Invert :func:`fold_rows` for a result ``[1, kv_head, batch * group * pos, *rest]``."""
    batch = shape[0]
    n_kv = x.shape[1]
    per_head = x.reshape(n_kv, batch, -1, *x.shape[3:]).transpose(0, 1)
    return per_head.reshape(shape)
