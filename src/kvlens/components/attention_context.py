"""What every layer's attention needs about one forward pass, computed once by the model."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from kvlens.components.attention_rules import causal_mask, visible

__all__ = ["AttentionContext", "build_attention_context", "causal_mask"]


@dataclass(frozen=True, eq=False)
class AttentionContext:
    """The keys' layout, padding and rotary angles of one forward pass, shared by every layer.

    The keys a new query may see are, by cache index: a shared prefix's ``prefix_len`` keys
    (stored once for all rows; 0 without one), then the rows' own ``own_len`` keys (cached, then
    the new ``n_new``). Masks follow :mod:`kvlens.components.attention_rules` and are built on
    first use, once per sliding window, so layers with the same window share them.

    Attributes:
        n_new: The new tokens (queries) of each row.
        own_len: The rows' own keys, cached and new.
        own_real: ``[batch, own_len]`` True at real keys, or ``None`` when none is padding.
        prefix_len: Keys of a shared prefix before the rows' own.
        prefix_real: ``[prefix_len]`` True at the prefix's real keys, or ``None`` (no padding).
        rotary_cos: ``[batch, pos, 1, rotary_dim / 2]`` for the new tokens (rotary models only).
        rotary_sin: Same shape as ``rotary_cos``.
        mask_device: Where masks are built (default: the device of the tensors above, or CPU).
    """

    n_new: int = 1
    own_len: int = 1
    own_real: Bool[Tensor, "batch own_pos"] | None = None
    prefix_len: int = 0
    prefix_real: Bool[Tensor, " prefix_pos"] | None = None
    rotary_cos: Float[Tensor, "batch pos 1 rotary_half"] | None = None
    rotary_sin: Float[Tensor, "batch pos 1 rotary_half"] | None = None
    mask_device: torch.device | None = None
    _masks: dict[tuple[str, int | None], tuple[Tensor | None, bool]] = field(
        default_factory=dict, repr=False
    )

    @property
    def total_len(self) -> int:
        """Keys of the last query: prefix and own."""
        return self.prefix_len + self.own_len

    @property
    def device(self) -> torch.device:
        """Where masks are built."""
        if self.mask_device is not None:
            return self.mask_device
        for t in (self.own_real, self.prefix_real, self.rotary_cos):
            if t is not None:
                return t.device
        return torch.device("cpu")

    @property
    def attn_mask(self) -> Bool[Tensor, "batch 1 pos own_pos"] | None:
        """The mask over the rows' own keys with no window (see :meth:`own_mask`)."""
        return self.own_mask(None)[0]

    @property
    def is_causal(self) -> bool:
        """Whether attention with no window is plain causal over exactly the new tokens."""
        return self.own_mask(None)[1]

    def own_mask(
        self, window: int | None
    ) -> tuple[Bool[Tensor, "batch 1 pos own_pos"] | None, bool]:
        """``(mask, is_causal)`` over the rows' own keys.

        ``mask`` is ``None`` when the queries see every own key (one new token, no padding, no
        window), or when ``is_causal`` says the rule is plain causal over exactly the new
        tokens, which ``scaled_dot_product_attention`` handles without a mask tensor.
        """
        key = ("own", window)
        if key not in self._masks:
            self._masks[key] = self._own_mask(window)
        return self._masks[key]

    def _own_mask(self, window: int | None) -> tuple[Tensor | None, bool]:
        n_new, own = self.n_new, self.own_len
        windowed = window is not None and window < self.total_len
        if self.own_real is None and not windowed:
            if n_new == 1:
                return None, False
            if own == n_new:  # the own keys are the new tokens: plain causal
                return None, True
        mask = visible(n_new, own, self.prefix_len, self.own_real, window, self.device)
        return mask, False

    def prefix_mask(self, window: int | None) -> Bool[Tensor, "1 1 pos prefix_pos"] | None:
        """The mask over a shared prefix's keys, ``[1, 1, 1 or pos, prefix_pos]``, or ``None``.

        Every query sees every real prefix key, unless a window ends before some of them (the
        same for every row: the rows' queries have the same cache indices).
        """
        if self.prefix_len == 0:
            return None
        key = ("prefix", window)
        if key not in self._masks:
            mask: Tensor | None
            if window is not None and window < self.total_len:
                # Queries are at cache indices >= prefix_len, so no prefix key is a query.
                mask = visible(self.n_new, self.total_len, 0, None, window, self.device)
                mask = mask[..., : self.prefix_len]
                if self.prefix_real is not None:
                    mask = mask & self.prefix_real[None, None, None, :]
            elif self.prefix_real is not None:
                mask = self.prefix_real[None, None, None, :]
            else:
                mask = None
            self._masks[key] = (mask, False)
        return self._masks[key][0]

    def to(self, device: torch.device) -> AttentionContext:
        """The same context with its tensors on ``device`` (for blocks on other devices)."""

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return replace(
            self,
            own_real=move(self.own_real),
            prefix_real=move(self.prefix_real),
            rotary_cos=move(self.rotary_cos),
            rotary_sin=move(self.rotary_sin),
            mask_device=device,
            _masks={},
        )


def build_attention_context(
    n_new: int,
    kv_len: int,
    full_mask: Int[Tensor, "batch kv_pos"] | None,
    has_padding: bool,
    device: torch.device,
    rotary: tuple[Tensor, Tensor] | None = None,
    prefix_real: Bool[Tensor, " prefix_pos"] | None = None,
    prefix_len: int = 0,
) -> AttentionContext:
    """The context of a pass of ``n_new`` tokens over ``kv_len`` own keys (cached plus new).

    Args:
        n_new: Tokens in this pass (queries).
        kv_len: The rows' own keys attended to: cached plus new.
        full_mask: The attention mask over the own keys (1 real, 0 padding), or ``None`` when
            there is no padding anywhere.
        has_padding: Whether ``full_mask`` has any 0 (decided once per forward by the caller).
        device: Where masks are built.
        rotary: ``(cos, sin)`` for the new tokens, for rotary models.
        prefix_real: A shared prefix's mask (True at real tokens), or ``None``.
        prefix_len: A shared prefix's length (0 without one).

    A padded query always sees itself, so it has a well-defined output (the eager and the fast
    paths then agree; TransformerLens gives a pad query an all-zero pattern).
    """
    cos, sin = rotary if rotary is not None else (None, None)
    own_real = None
    if has_padding:
        if full_mask is None:
            raise ValueError("has_padding is True but no full_mask was given")
        own_real = full_mask.to(device=device, dtype=torch.bool)
    return AttentionContext(
        n_new, kv_len, own_real, prefix_len, prefix_real, cos, sin, torch.device(device)
    )
