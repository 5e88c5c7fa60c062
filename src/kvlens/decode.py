"""The decode loop: run the prompt once, then one decode step per token through the cache.

Small free functions (``run_prompt``, ``decode_step``, ``generate_tokens``) that import no decoding
strategy, so that :mod:`kvlens.beam` and :mod:`kvlens.speculative` build on them and
:mod:`kvlens.generate` (the model's ``generate``) imports both without a cycle.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from kvlens.cache import KeyValueCache, SharedPrefixCache
from kvlens.cache.shared import is_shareable_prefix
from kvlens.generation_config import GenerationConfig
from kvlens.hook_point import HookPoint
from kvlens.sampling import sample_logits

if TYPE_CHECKING:
    from kvlens.model import HookedTransformer


@torch.no_grad()
def last_position_logits(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"] | Float[Tensor, "batch pos d_model"],
    attention_mask: Int[Tensor, "batch pos"] | None,
    cache: KeyValueCache | SharedPrefixCache | None,
) -> Float[Tensor, "batch d_vocab"]:
    """Run ``tokens`` (or token embeddings) after what ``cache`` holds and return the logits of
    the last position.

    Only the last position is unembedded: for a long prompt that skips most of the largest
    matrix product of the prefill. (When a hook observes the final norm, every position goes
    through it and the unembedding, as in a forward pass, so that the hook sees them all.)
    ``attention_mask=None`` means every token is real (no padding is guessed from pad tokens,
    unlike a forward pass with a cache).
    """
    if attention_mask is None:
        attention_mask = torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)
    if _final_norm_observed(model):
        return model(tokens, past_kv_cache=cache, attention_mask=attention_mask)[:, -1]
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


def _final_norm_observed(model: HookedTransformer) -> bool:
    """Whether a hook observes one of the final norm's hook points."""
    norm = model.ln_final if model.cfg.final_norm else None
    if not isinstance(norm, torch.nn.Module):
        return False
    return any(isinstance(m, HookPoint) and m.is_observed for m in norm.modules())


def run_prompt(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"] | Float[Tensor, "batch pos d_model"],
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
    prompt: Int[Tensor, "batch pos"] | Float[Tensor, "batch pos d_model"],
    attention_mask: Int[Tensor, "batch pos"],
) -> tuple[Tensor, Int[Tensor, "batch pos"]]:
    """Move each row's padding to its start, keeping its real tokens (or embeddings) in order.

    Pad tokens take no position and no token attends to them, so a row means the same wherever
    its pads sit; with every pad in front, the last position of each row is its last real token,
    where its next token is read.
    """
    order = alignment_order(attention_mask)
    index = order if prompt.ndim == 2 else order[..., None].expand_as(prompt)
    return prompt.gather(1, index), attention_mask.gather(1, order)


def alignment_order(attention_mask: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch pos"]:
    """The permutation :func:`left_align` applies to each row: ``aligned[:, j]`` is
    ``original[:, order[:, j]]``."""
    return (attention_mask != 0).to(torch.int32).argsort(dim=1, stable=True)


class Step(NamedTuple):
    """One generation step: each row's new token and the logits it was chosen from."""

    token: Int[Tensor, " batch"]
    logits: Float[Tensor, "batch d_vocab"]


def generate_tokens(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None,
    options: GenerationConfig,
    past_kv_cache: KeyValueCache | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[Int[Tensor, " batch"]]:
    """Yield each step's new token of every row (:func:`generation_steps`' tokens)."""
    for step in generation_steps(model, tokens, attention_mask, options, past_kv_cache, generator):
        yield step.token


def generation_steps(
    model: HookedTransformer,
    prompt: Int[Tensor, "batch pos"] | Float[Tensor, "batch pos d_model"],
    attention_mask: Int[Tensor, "batch pos"] | None,
    options: GenerationConfig,
    past_kv_cache: KeyValueCache | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[Step]:
    """Yield each step's new token of every row and its logits (``options``' strategy fields
    are not read).

    ``prompt`` is token ids, or token embeddings ``[batch, pos, d_model]`` in place of
    ``embed(tokens)`` (see :meth:`HookedTransformer.forward`). Each row gives what it gives
    alone: padding may sit anywhere in ``attention_mask`` (left, right, or both); it is moved
    to the front of each row first (:func:`left_align`). ``attention_mask=None`` means every
    token is real. A row that produced an EOS (when ``options.eos_token_ids`` is not empty)
    yields ``options.pad_token_id`` from then on; generation ends when every row has, or after
    ``options.max_new_tokens``. With ``options.feed_last_token``, the last token yielded is run
    through the model too (its logits unused), so that hooks see every position.
    """
    outer = model.generation_step
    try:
        yield from _generation_steps(
            model, prompt, attention_mask, options, past_kv_cache, generator
        )
    finally:
        model.set_generation_step(outer)


def _generation_steps(
    model: HookedTransformer,
    prompt: Int[Tensor, "batch pos"] | Float[Tensor, "batch pos d_model"],
    attention_mask: Int[Tensor, "batch pos"] | None,
    options: GenerationConfig,
    past_kv_cache: KeyValueCache | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[Step]:
    """:func:`generation_steps`' loop, setting the model's generation step as it goes."""
    # Read once: the loop below does no per-step attribute lookups or checks on ``options``.
    max_new_tokens, sampling = options.max_new_tokens, options.sampling
    pad_token_id, use_past_kv_cache = options.pad_token_id, options.use_past_kv_cache
    feed_last_token = options.feed_last_token
    batch, n_prompt = prompt.shape[0], prompt.shape[1]
    device = prompt.device
    if attention_mask is None:
        attention_mask = torch.ones(prompt.shape[:2], dtype=torch.long, device=device)
    else:
        prompt, attention_mask = left_align(prompt, attention_mask.to(device))
    counts = None
    if sampling.freq_penalty > 0 and not sampling.greedy:
        counts = torch.zeros((batch, model.cfg.d_vocab), device=device)
        if not prompt.is_floating_point():  # embeddings: only generated tokens count
            counts.scatter_add_(1, prompt, attention_mask.to(counts.dtype))
    eos = torch.tensor(options.eos_token_ids, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    real = torch.ones((batch, 1), dtype=torch.int32, device=device)  # every new token's mask
    cache: KeyValueCache | SharedPrefixCache
    model.set_generation_step(0)  # hooks read it as hook.pass_info.step
    if use_past_kv_cache and is_shareable_prefix(past_kv_cache):
        # Every row continues the frozen prefix, which stays as it is; the rows' own tokens go
        # into a suffix cache after it.
        cache = SharedPrefixCache.from_prefix(past_kv_cache, batch, n_prompt + max_new_tokens)
        logits = last_position_logits(model, prompt, attention_mask, cache)
    elif use_past_kv_cache:
        logits, cache = run_prompt(
            model, prompt, attention_mask, past_kv_cache, n_prompt + max_new_tokens
        )
    else:
        if past_kv_cache is not None:
            raise ValueError("past_kv_cache needs use_past_kv_cache=True")
        sequence, sequence_mask = prompt, attention_mask
        logits = last_position_logits(model, sequence, sequence_mask, None)
    step = 0
    while step < max_new_tokens:
        token = sample_logits(logits, sampling, counts, generator)
        if eos.numel():
            token = torch.where(finished, torch.full_like(token, pad_token_id), token)
            finished |= torch.isin(token, eos)
        if counts is not None:
            counts.scatter_add_(
                1, token[:, None], torch.ones_like(token[:, None], dtype=counts.dtype)
            )
        yield Step(token, logits)
        last = step == max_new_tokens - 1 or (eos.numel() and bool(finished.all()))
        if last and not feed_last_token:
            return
        step += 1
        model.set_generation_step(step)
        if use_past_kv_cache:
            logits = decode_step(model, token, cache, real)
        else:
            sequence = _extended(model, sequence, token)
            sequence_mask = torch.cat([sequence_mask, real.to(sequence_mask.dtype)], dim=1)
            logits = last_position_logits(model, sequence, sequence_mask, None)
        if last:
            return


@torch.no_grad()
def _extended(
    model: HookedTransformer,
    sequence: Int[Tensor, "batch pos"] | Float[Tensor, "batch pos d_model"],
    token: Int[Tensor, " batch"],
) -> Tensor:
    """``sequence`` (tokens or token embeddings) followed by ``token``."""
    if sequence.is_floating_point():
        return torch.cat([sequence, model.embed(token[:, None]).to(sequence.dtype)], dim=1)
    return torch.cat([sequence, token[:, None]], dim=1)
