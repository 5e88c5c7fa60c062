"""A forward pass's positions and masks when many rows continue one shared prefix."""

from __future__ import annotations

from typing import TYPE_CHECKING

from jaxtyping import Int
from torch import Tensor

from kvlens.cache.shared import SharedPrefixCache
from kvlens.components.shared_prefix_attention import (
    SharedPrefixContext,
    build_shared_prefix_context,
)

if TYPE_CHECKING:
    from kvlens.model import HookedTransformer


def prepare_shared_prefix(
    model: HookedTransformer,
    tokens: Tensor | None,
    batch: int,
    n_new: int,
    attention_mask: Tensor | None,
    cache: SharedPrefixCache,
    first_layer: int,
) -> tuple[
    SharedPrefixContext,
    Int[Tensor, "batch pos"],
    Int[Tensor, "batch pos"] | None,
    Int[Tensor, "batch pos"] | None,
]:
    """Context, positions, the new tokens' pad mask and loss mask (``HookedTransformer._prepare``).

    The suffix's mask is extended as a plain cache's would be. Positions continue after the
    prefix's real tokens: a suffix token's is ``prefix_positions + (real suffix tokens up to it)
    - 1``, exactly what the row run alone after the prefix would give it.
    """
    cache.check_prefix()
    if cache.batch_size != batch:
        raise ValueError(
            f"past_kv_cache is shared by {cache.batch_size} rows, the input has {batch}"
        )
    device = model.position_ids.device
    new_mask = model._check_attention_mask(attention_mask, batch, n_new, device, ones_if_none=True)
    suffix_mask, offset = model._full_mask(
        new_mask, attention_mask is not None, cache.suffix, first_layer
    )
    has_padding = model._host_checks(tokens, suffix_mask)
    start = cache.prefix_positions + offset
    if has_padding:
        assert suffix_mask is not None
        suffix_mask = suffix_mask.to(device)
        counts = suffix_mask.cumsum(dim=-1)[:, offset:]
        positions = (cache.prefix_positions + counts - 1).clamp(min=0)
        too_long = start + n_new > model.cfg.n_ctx and int(positions.max()) >= model.cfg.n_ctx
    else:
        positions = model.position_ids[start : start + n_new].unsqueeze(0)
        too_long = start + n_new > model.cfg.n_ctx
    if too_long:
        raise ValueError(
            f"positions reach {start + n_new - 1} (shared prefix {cache.prefix_positions} + "
            f"suffix {offset} + {n_new} new tokens), the model supports positions below "
            f"n_ctx={model.cfg.n_ctx}"
        )
    rotary = model.rotary(positions) if model.cfg.positional_embedding_type == "rotary" else None
    ctx = build_shared_prefix_context(
        n_new, offset + n_new, suffix_mask, has_padding, device, rotary, cache.prefix_mask
    )
    pad_mask = suffix_mask[:, offset:] if has_padding and suffix_mask is not None else None
    loss_mask = new_mask if attention_mask is not None else None
    return ctx, positions, pad_mask, loss_mask
