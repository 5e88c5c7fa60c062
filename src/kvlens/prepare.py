"""What a forward pass checks and computes once before the blocks run, for either kind of cache.

:func:`tokens_from_input` and :func:`check_residual` turn the input into what the model embeds or
runs; :func:`check_cache` refuses a cache before anything is written to it; :func:`prepare_pass`
stages the attention mask, makes the pass's one host synchronisation and returns the positions,
masks and attention context every layer shares (:class:`Prepared`), over a plain
:class:`KeyValueCache`, a :class:`SharedPrefixCache` (many rows after one frozen prefix) or none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from kvlens.cache.cache import MASK_DTYPE, KeyValueCache
from kvlens.cache.entry import KeyValueCacheEntry
from kvlens.cache.shared import SharedPrefixCache
from kvlens.components.attention_context import AttentionContext, build_attention_context
from kvlens.components.positions import positions_from_mask

if TYPE_CHECKING:
    from kvlens.model import HookedTransformer


@dataclass(frozen=True)
class Prepared:
    """Per-forward facts computed once and shared by every layer.

    Attributes:
        ctx: The keys' layout (a shared prefix's too), padding and rotary angles.
        positions: The new tokens' positions, ``[1, pos]`` when nothing is padded.
        pad_mask: The new tokens' mask, when anything is padded.
        loss_mask: The ``attention_mask`` the caller gave, for the loss.
    """

    ctx: AttentionContext
    positions: Int[Tensor, "batch pos"]
    pad_mask: Int[Tensor, "batch pos"] | None
    loss_mask: Int[Tensor, "batch pos"] | None

    def to(self, device: torch.device) -> Prepared:
        """The same facts with the attention context on ``device`` (for blocks on other devices)."""
        return Prepared(self.ctx.to(device), self.positions, self.pad_mask, self.loss_mask)


# Input ----------------------------------------------------------------------------------------


def tokens_from_input(input: Any, device: torch.device) -> Int[Tensor, "batch pos"]:
    """``input`` as int64 token ids ``[batch, pos]`` on ``device``; raise unless it holds ids."""
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a tensor of token ids, got {type(input).__name__}")
    if input.is_floating_point() or input.is_complex() or input.dtype == torch.bool:
        raise TypeError(
            f"input must hold integer token ids, got {input.dtype} (to feed a residual "
            "stream, pass start_at_layer; token embeddings are [batch, pos, d_model])"
        )
    if input.ndim == 1:
        input = input.unsqueeze(0)
    if input.ndim != 2 or input.shape[1] == 0:
        raise ValueError(f"input must be [batch, pos] with pos >= 1, got {tuple(input.shape)}")
    # Ids of any integer dtype (uint8, int16, ...) as int64: a range check in a narrow dtype
    # would wrap (d_vocab=49152 does not fit int16).
    return input.to(device, torch.long)


def check_residual(
    input: Any, d_model: int, what: str = "with start_at_layer, input"
) -> Float[Tensor, "batch pos d_model"]:
    """``input`` unchanged; raise unless it is a float ``[batch, pos, d_model]`` tensor (``what``
    names it in the error)."""
    if not isinstance(input, Tensor) or not input.is_floating_point():
        raise TypeError(f"{what} must be a float residual stream tensor")
    if input.ndim != 3 or input.shape[2] != d_model or input.shape[1] == 0:
        raise ValueError(
            f"{what} must be [batch, pos, d_model={d_model}], got {tuple(input.shape)}"
        )
    return input


# Checks before writes ---------------------------------------------------------------------------


def check_cache(
    model: HookedTransformer,
    cache: KeyValueCache | SharedPrefixCache,
    batch: int,
    first_layer: int,
    devices: list[torch.device],
) -> None:
    """Raise before anything is written unless ``cache`` can take this pass of ``model``.

    Checks the weights' fingerprint (a cache filled by another model is refused), and for
    every layer from ``first_layer`` on: one length for all of them, the batch size, key and
    value heads, ``d_head``, dtype and device of its entry against its block (on ``devices``,
    each block's device as the config places it).
    """
    cfg = model.cfg
    if len(cache) != cfg.n_layers:
        raise ValueError(f"past_kv_cache has {len(cache)} layers, this model has {cfg.n_layers}")
    if isinstance(cache, SharedPrefixCache):
        cache.check_prefix()
        if cache.batch_size != batch:
            raise ValueError(
                f"past_kv_cache is shared by {cache.batch_size} rows, the input has {batch}"
            )
    own = model.weights_fingerprint()
    filled = [cache.prefix, cache.suffix] if isinstance(cache, SharedPrefixCache) else [cache]
    for part in filled:
        if part.weights_fingerprint not in (None, own):
            raise ValueError(
                "past_kv_cache was filled by another model: its keys and values come from "
                f"weights with fingerprint {part.weights_fingerprint}, this model's are "
                f"{own}; prefill a new cache with this model"
            )
    plain = cache.suffix if isinstance(cache, SharedPrefixCache) else cache
    length = plain[first_layer].length
    # This runs every decode step: one tuple comparison per layer against what the config
    # says (kept in step with the weights by the model's _apply); the exact check against the
    # layer's weights, and its message, only where that comparison fails.
    want = (length, batch, cfg.n_kv_heads, cfg.d_head, cfg.dtype)
    for i in range(first_layer, cfg.n_layers):
        entry = plain.entries[i]
        got = (entry.length, entry.batch_size, entry.n_kv_heads, entry.d_head, entry.dtype)
        if got != want or entry.device != devices[i]:
            check_entry(i, entry, model.blocks[i].attn, batch, length)


def check_entry(layer: int, entry: KeyValueCacheEntry, attn: Any, batch: int, length: int) -> None:
    """Raise unless ``entry`` fits layer ``layer``'s attention ``attn`` for ``batch`` rows."""
    weight = attn.W_QKV
    where = f"past_kv_cache's layer {layer}"
    if entry.length != length:
        raise ValueError(
            f"{where} holds {entry.length} positions, its first layer {length}: its layers were "
            "extended unevenly (reset() or crop() it to a common length)"
        )
    if entry.batch_size != batch:
        raise ValueError(f"{where} has batch size {entry.batch_size}, the input has {batch}")
    if (entry.n_kv_heads, entry.d_head) != (attn.n_kv_heads, attn.d_head):
        raise ValueError(
            f"{where} stores {entry.n_kv_heads} key/value heads of d_head {entry.d_head}, this "
            f"model's layer {layer} has {attn.n_kv_heads} of d_head {attn.d_head}"
        )
    if entry.dtype != weight.dtype:
        raise TypeError(
            f"{where} stores {entry.dtype}, this model's layer {layer} computes in "
            f"{weight.dtype}; build the cache from model.cfg (KeyValueCache.init_cache(model.cfg, "
            "...)) after moving the model"
        )
    if entry.device != weight.device:
        raise ValueError(
            f"{where} is on {entry.device}, this model's layer {layer} is on {weight.device}; "
            "build the cache from model.cfg (KeyValueCache.init_cache(model.cfg, ...)) after "
            "moving the model"
        )


# Preparation, once per pass ---------------------------------------------------------------------


def prepare_pass(
    model: HookedTransformer,
    tokens: Tensor | None,
    batch: int,
    n_new: int,
    attention_mask: Tensor | None,
    cache: KeyValueCache | SharedPrefixCache | None,
    first_layer: int,
) -> Prepared:
    """Positions, masks and rotary angles for this pass, with its one host synchronisation.

    The new tokens' mask is staged after the cache's (``append_attention_mask(commit=False)``;
    the model commits it when the whole pass has run); over a shared prefix, after its suffix's,
    as a plain cache's would be. ``tokens`` (``None`` for residual input) are range-checked in
    the same host sync that finds whether anything is padded. Over a shared prefix, positions
    continue after the prefix's real tokens: a suffix token's is ``prefix_positions + (real
    suffix tokens up to it) - 1``, exactly what the row run alone after the prefix would give it.
    """
    shared = cache if isinstance(cache, SharedPrefixCache) else None
    if shared is not None:
        shared.check_prefix()
        if shared.batch_size != batch:
            raise ValueError(
                f"past_kv_cache is shared by {shared.batch_size} rows, the input has {batch}"
            )
    cfg = model.cfg
    device = model.position_ids.device
    new_mask = check_attention_mask(
        attention_mask, batch, n_new, device, ones_if_none=cache is not None
    )
    full_mask, offset = staged_mask(
        new_mask,
        attention_mask is not None,
        cache.suffix if isinstance(cache, SharedPrefixCache) else cache,
        first_layer,
        cfg.n_layers,
    )
    has_padding = host_checks(tokens, full_mask, cfg.d_vocab)
    start = offset if shared is None else shared.prefix_positions + offset
    if has_padding:
        assert full_mask is not None
        full_mask = full_mask.to(device)
        if shared is None:
            positions = positions_from_mask(full_mask, n_new)
        else:
            counts = full_mask.cumsum(dim=-1)[:, offset:]
            positions = (shared.prefix_positions + counts - 1).clamp(min=0)
        too_long = start + n_new > cfg.n_ctx and int(positions.max()) >= cfg.n_ctx
    else:
        positions = model.position_ids[start : start + n_new].unsqueeze(0)
        too_long = start + n_new > cfg.n_ctx
    if too_long:
        where = (
            f"cache {offset}"
            if shared is None
            else f"shared prefix {shared.prefix_positions} + suffix {offset}"
        )
        raise ValueError(
            f"positions reach {start + n_new - 1} ({where} + {n_new} new tokens), "
            f"the model supports positions below n_ctx={cfg.n_ctx}"
        )
    rotary = model.rotary(positions) if cfg.positional_embedding_type == "rotary" else None
    prefix_real = None
    if shared is not None and shared.prefix_mask is not None:
        prefix_real = shared.prefix_mask.reshape(-1)
    ctx = build_attention_context(
        n_new,
        offset + n_new,
        full_mask,
        has_padding,
        device,
        rotary,
        prefix_real=prefix_real,
        prefix_len=0 if shared is None else shared.prefix_length,
    )
    pad_mask = full_mask[:, offset:] if has_padding and full_mask is not None else None
    loss_mask = new_mask if attention_mask is not None else None
    return Prepared(ctx, positions, pad_mask, loss_mask)


def check_attention_mask(
    mask: Tensor | None,
    batch: int,
    n_new: int,
    device: torch.device,
    ones_if_none: bool,
) -> Tensor | None:
    """The new tokens' mask, validated; all ones if none is given but a cache needs one."""
    if mask is None:
        if not ones_if_none:
            return None
        return torch.ones(batch, n_new, dtype=MASK_DTYPE, device=device)
    if not isinstance(mask, Tensor) or mask.is_floating_point() or mask.is_complex():
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"attention_mask must be an integer or bool tensor, got {got}")
    if mask.ndim == 1 and batch == 1:
        mask = mask.unsqueeze(0)
    if tuple(mask.shape) != (batch, n_new):
        raise ValueError(
            f"attention_mask has shape {tuple(mask.shape)}, expected {(batch, n_new)} "
            "(the input's [batch, pos])"
        )
    return mask if mask.device == device else mask.to(device)


def staged_mask(
    new_mask: Tensor | None,
    mask_given: bool,
    cache: KeyValueCache | None,
    first_layer: int,
    n_layers: int,
) -> tuple[Tensor | None, int]:
    """The mask over cached and new tokens (extending the cache's), and the cache's length.

    The new part is staged in the cache (``append_attention_mask(commit=False)``): its stored
    length advances when the whole pass has run and the model commits it.
    """
    if cache is None or new_mask is None:
        return new_mask, 0
    batch, n_new = new_mask.shape
    if cache.batch_size != batch or len(cache) != n_layers:
        raise ValueError(
            f"past_kv_cache has batch size {cache.batch_size} and {len(cache)} layers, "
            f"expected batch size {batch} (the input's) and n_layers={n_layers}"
        )
    offset = cache[first_layer].length
    stored = cache.previous_attention_mask.shape[1]
    if stored == offset:
        return cache.append_attention_mask(new_mask, commit=False), offset
    if first_layer > 0 and stored == offset + n_new:
        # The blocks before first_layer already ran on these tokens with this cache (a
        # stop_at_layer pass) and extended its mask: reuse it unless a mask is given now.
        if not mask_given:
            return cache.previous_attention_mask, offset
        prefix = cache.previous_attention_mask[:, :offset]
        return torch.cat((prefix, new_mask.to(prefix.device, MASK_DTYPE)), dim=1), offset
    raise ValueError(
        f"past_kv_cache's attention mask covers {stored} positions but its entry for layer "
        f"{first_layer} holds {offset}; its layers were extended unevenly"
    )


def host_checks(tokens: Tensor | None, full_mask: Tensor | None, d_vocab: int) -> bool:
    """Check token ids against ``d_vocab`` and find whether anything is padded, in one host sync."""
    flags = []
    if tokens is not None:
        flags.append(((tokens < 0) | (tokens >= d_vocab)).any())
    if full_mask is not None:
        flags.append((full_mask == 0).any().to(flags[0].device if flags else full_mask.device))
    if not flags:
        return False
    values = torch.stack(flags).tolist()
    if tokens is not None and values[0]:
        raise ValueError(
            f"input holds token ids in [{int(tokens.min())}, {int(tokens.max())}], "
            f"expected ids in [0, d_vocab={d_vocab})"
        )
    return bool(values[-1]) if full_mask is not None else False
