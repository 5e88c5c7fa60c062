"""The decode loop: run the prompt once, then one decode step per token through the cache.

Small free functions (``run_prompt``, ``decode_step``, ``generate_tokens``) that import no decoding
strategy, so that :mod:`kvlens.beam` and :mod:`kvlens.speculative` build on them and
:mod:`kvlens.generate` (the model's ``generate``) imports both without a cycle.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor

from kvlens.cache import KeyValueCache, SharedPrefixCache
from kvlens.cache.shared import is_shareable_prefix
from kvlens.generation_config import GenerationConfig
from kvlens.sampling import sample_logits

if TYPE_CHECKING:
    from kvlens.model import HookedTransformer


@torch.no_grad()
def last_position_logits(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None,
    cache: KeyValueCache | SharedPrefixCache | None,
) -> Float[Tensor, "batch d_vocab"]:
    """Run ``tokens`` (after what ``cache`` holds) and return the logits of the last position.

    Only the last position is unembedded: for a long prompt that skips most of the largest
    matrix product of the prefill. ``attention_mask=None`` means every token is real (no
    padding is guessed from pad tokens, unlike a forward pass with a cache).
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(tokens)
    resid = model(
        tokens,
        past_kv_cache=cache,
        attention_mask=attention_mask,
        stop_at_layer=model.cfg.n_layers,
    )
    resid = resid[:, -1:]
    if model.cfg.final_norm:
        resid = model.ln_final(resid)
    return model.unembed(resid)[:, 0]


def run_prompt(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    cache: KeyValueCache | None = None,
    capacity: int = 0,
) -> tuple[Float[Tensor, "batch d_vocab"], KeyValueCache]:
    """The generation loop's first step: ``tokens`` into a cache (a new one unless given).

    Unlike :meth:`HookedTransformer.prefill` (the public way to fill a cache, which returns the
    cache only and infers padding as TransformerLens does), this unembeds the last position only
    and reads ``attention_mask=None`` as every token real, as a generation loop needs.

    Returns:
        The logits of the last position and the cache.
    """
    if cache is None:
        cache = KeyValueCache.init_cache(model.cfg, model.cfg.device, tokens.shape[0], capacity)
    else:
        cache.reserve(cache.seq_len + capacity)
    return last_position_logits(model, tokens, attention_mask, cache), cache


@torch.no_grad()
def decode_step(
    model: HookedTransformer,
    token: Int[Tensor, " batch"],
    cache: KeyValueCache | SharedPrefixCache,
    real: Int[Tensor, "batch 1"] | None = None,
) -> Float[Tensor, "batch d_vocab"]:
    """Feed one token per row and return the next logits; the cache grows by one position.

    Args:
        model: The model.
        token: The new token of each row. It is real even when it is the pad token (a
            generated EOS that doubles as the pad token stays visible to later tokens).
        cache: The cache to read and extend.
        real: All ones ``[batch, 1]``, the token's mask, made once by a caller that steps many
            times (default: made here).
    """
    column = token[:, None]
    mask = real if real is not None else torch.ones_like(column)
    return model(column, past_kv_cache=cache, attention_mask=mask)[:, -1]


def left_align(
    tokens: Int[Tensor, "batch pos"], attention_mask: Int[Tensor, "batch pos"]
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Move each row's padding to its start, keeping its real tokens in order.

    Pad tokens take no position and no token attends to them, so a row means the same wherever
    its pads sit; with every pad in front, the last position of each row is its last real token,
    where its next token is read.
    """
    order = (attention_mask != 0).to(torch.int32).argsort(dim=1, stable=True)
    return tokens.gather(1, order), attention_mask.gather(1, order)


def generate_tokens(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None,
    options: GenerationConfig,
    past_kv_cache: KeyValueCache | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[Int[Tensor, " batch"]]:
    """Yield each step's new token of every row (``options``' strategy fields are not read).

    Each row gives what it gives alone: padding may sit anywhere in ``attention_mask`` (left,
    right, or both); it is moved to the front of each row first (:func:`left_align`).
    ``attention_mask=None`` means every token is real. A row that produced an EOS (when
    ``options.eos_token_ids`` is not empty) yields ``options.pad_token_id`` from then on;
    generation ends when every row has, or after ``options.max_new_tokens``.
    """
    outer = model.generation_step
    try:
        yield from _generate_tokens(
            model, tokens, attention_mask, options, past_kv_cache, generator
        )
    finally:
        model.set_generation_step(outer)


def _generate_tokens(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None,
    options: GenerationConfig,
    past_kv_cache: KeyValueCache | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[Int[Tensor, " batch"]]:
    """:func:`generate_tokens`' loop, setting the model's generation step as it goes."""
    # Read once: the loop below does no per-step attribute lookups or checks on ``options``.
    max_new_tokens, sampling = options.max_new_tokens, options.sampling
    pad_token_id, use_past_kv_cache = options.pad_token_id, options.use_past_kv_cache
    batch = tokens.shape[0]
    device = tokens.device
    if attention_mask is None:
        attention_mask = torch.ones_like(tokens)
    else:
        tokens, attention_mask = left_align(tokens, attention_mask.to(device))
    counts = None
    if sampling.freq_penalty > 0 and not sampling.greedy:
        counts = torch.zeros((batch, model.cfg.d_vocab), device=device)
        counts.scatter_add_(1, tokens, attention_mask.to(counts.dtype))
    eos = torch.tensor(options.eos_token_ids, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    real = torch.ones((batch, 1), dtype=torch.int32, device=device)  # every new token's mask
    cache: KeyValueCache | SharedPrefixCache
    model.set_generation_step(0)  # hooks read it as hook.pass_info.step
    if use_past_kv_cache and is_shareable_prefix(past_kv_cache):
        # Every row continues the frozen prefix, which stays as it is; the rows' own tokens go
        # into a suffix cache after it.
        cache = SharedPrefixCache.from_prefix(
            past_kv_cache, batch, tokens.shape[1] + max_new_tokens
        )
        logits = last_position_logits(model, tokens, attention_mask, cache)
    elif use_past_kv_cache:
        logits, cache = run_prompt(
            model, tokens, attention_mask, past_kv_cache, tokens.shape[1] + max_new_tokens
        )
    else:
        if past_kv_cache is not None:
            raise ValueError("past_kv_cache needs use_past_kv_cache=True")
        all_tokens, all_mask = tokens, attention_mask
        logits = last_position_logits(model, all_tokens, all_mask, None)
    for step in range(max_new_tokens):
        token = sample_logits(logits, sampling, counts, generator)
        if eos.numel():
            token = torch.where(finished, torch.full_like(token, pad_token_id), token)
            finished |= torch.isin(token, eos)
        if counts is not None:
            counts.scatter_add_(
                1, token[:, None], torch.ones_like(token[:, None], dtype=counts.dtype)
            )
        yield token
        if step == max_new_tokens - 1 or (eos.numel() and bool(finished.all())):
            return
        model.set_generation_step(step + 1)
        if use_past_kv_cache:
            logits = decode_step(model, token, cache, real)
        else:
            all_tokens = torch.cat([all_tokens, token[:, None]], dim=1)
            all_mask = torch.cat([all_mask, real.to(all_mask.dtype)], dim=1)
            logits = last_position_logits(model, all_tokens, all_mask, None)
