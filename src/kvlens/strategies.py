"""The decoding strategies ``generate`` offers besides sampling: beam search and speculative."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from jaxtyping import Int
from torch import Tensor

from kvlens.beam import EarlyStopping, beam_search
from kvlens.cache import KeyValueCache
from kvlens.speculative import SpeculativeStats, speculative_generate

if TYPE_CHECKING:
    from kvlens.model import HookedTransformer


def strategy_new_tokens(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"],
    max_new_tokens: int,
    do_sample: bool,
    eos_token_ids: Sequence[int],
    past_kv_cache: KeyValueCache | None,
    num_beams: int,
    length_penalty: float,
    early_stopping: EarlyStopping,
    draft_model: HookedTransformer | None,
    num_speculative_tokens: int,
    speculative_stats: SpeculativeStats | None,
) -> Int[Tensor, "1 new"]:
    """The new tokens of beam search (``num_beams > 1``) or speculative decoding (a draft)."""
    name = "beam search" if num_beams > 1 else "speculative decoding"
    if num_beams > 1 and draft_model is not None:
        raise ValueError("give num_beams > 1 or draft_model, not both")
    if do_sample:
        raise ValueError(f"{name} is greedy here: pass do_sample=False")
    if tokens.shape[0] != 1:
        raise ValueError(f"{name} takes one prompt, got a batch of {tokens.shape[0]}")
    if not bool(attention_mask.all()):
        raise ValueError(f"{name} takes a prompt without padding")
    if past_kv_cache is not None:
        raise ValueError(f"{name} does not continue a past_kv_cache yet")
    if max_new_tokens == 0:
        return tokens[:, :0]
    if draft_model is not None:
        return speculative_generate(
            model,
            draft_model,
            tokens,
            max_new_tokens,
            num_speculative_tokens,
            eos_token_ids,
            speculative_stats,
        )
    best = beam_search(
        model, tokens, max_new_tokens, num_beams, length_penalty, eos_token_ids, early_stopping
    )
    return best.tokens[None].to(torch.long)
