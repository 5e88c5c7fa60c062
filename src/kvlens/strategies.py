"""The decoding strategies ``generate`` offers besides sampling: beam search and speculative."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from jaxtyping import Int
from torch import Tensor

from kvlens.beam import beam_search
from kvlens.cache import KeyValueCache
from kvlens.generation_config import GenerationConfig
from kvlens.speculative import speculative_generate

if TYPE_CHECKING:
    from kvlens.model import HookedTransformer


def strategy_new_tokens(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"],
    options: GenerationConfig,
    past_kv_cache: KeyValueCache | None,
) -> Int[Tensor, "1 new"]:
    """The new tokens of beam search (``num_beams > 1``) or speculative decoding (a draft).

    ``options`` has checked the arguments alone (one strategy, greedy); this checks the prompt.
    """
    name = options.strategy
    if name is None:
        raise ValueError("strategy_new_tokens needs num_beams > 1 or a draft_model")
    if tokens.shape[0] != 1:
        raise ValueError(f"{name} takes one prompt, got a batch of {tokens.shape[0]}")
    if not bool(attention_mask.all()):
        raise ValueError(f"{name} takes a prompt without padding")
    if past_kv_cache is not None:
        raise ValueError(f"{name} does not continue a past_kv_cache yet")
    if options.max_new_tokens == 0:
        return tokens[:, :0]
    if options.draft_model is not None:
        return speculative_generate(
            model,
            options.draft_model,
            tokens,
            options.max_new_tokens,
            options.num_speculative_tokens,
            options.eos_token_ids,
            options.stats,
        )
    best = beam_search(
        model,
        tokens,
        options.max_new_tokens,
        options.num_beams,
        options.length_penalty,
        options.eos_token_ids,
        options.early_stopping,
    )
    return best.tokens[None].to(torch.long)
