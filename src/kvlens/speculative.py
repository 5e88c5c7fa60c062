"""Greedy speculative decoding: a small draft model proposes, the target verifies in one pass.

Each round the draft proposes ``k`` tokens greedily through its own cache; the target runs its
last token and the ``k`` proposals in one forward pass through its cache and keeps the longest
prefix of proposals equal to its own greedy choices, plus its own next token. Both caches are then
cropped back (``KeyValueCache.crop``, O(1)) to the accepted length. The output is the target's
greedy output, token for token; the speed-up depends on how often the draft agrees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Int
from torch import Tensor

from kvlens.cache import KeyValueCache
from kvlens.decode import last_position_logits, run_prompt

if TYPE_CHECKING:
    from kvlens.model import HookedTransformer


@dataclass
class SpeculativeStats:
    """Counts of one speculative generation, filled in as it runs."""

    rounds: int = 0
    proposed: int = 0
    accepted: int = 0
    new_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Share of the draft's proposals the target accepted (0 when none were proposed)."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_round(self) -> float:
        """New tokens per target forward pass (1.0 is plain decoding)."""
        return self.new_tokens / self.rounds if self.rounds else 0.0


@torch.no_grad()
def speculative_generate(
    target: HookedTransformer,
    draft: HookedTransformer,
    tokens: Int[Tensor, "1 pos"],
    max_new_tokens: int,
    num_speculative_tokens: int = 4,
    eos_token_ids: Sequence[int] = (),
    stats: SpeculativeStats | None = None,
) -> Int[Tensor, "1 new"]:
    """The target's greedy continuation of ``tokens`` (one row), drafted by ``draft``.

    Args:
        target: The model whose greedy output this is.
        draft: A model over the same vocabulary, usually much smaller.
        tokens: The prompt, ``[1, pos]``.
        max_new_tokens: Tokens to add at most.
        num_speculative_tokens: Proposals per round (``k``, >= 1).
        eos_token_ids: Generation stops after the first of these (which is kept).
        stats: Filled in with the counts of this run (acceptance rate and so on).

    Returns:
        The new tokens, ``[1, new]``: as many as ``max_new_tokens`` or up to the first EOS.
    """
    _check(target, draft, tokens, max_new_tokens, num_speculative_tokens)
    stats = stats if stats is not None else SpeculativeStats()
    pos = tokens.shape[1]
    if max_new_tokens == 0:
        return tokens[:, :0]
    capacity = pos + max_new_tokens + num_speculative_tokens + 1
    logits, target_cache = run_prompt(target, tokens, capacity=capacity)
    draft_cache = KeyValueCache.init_cache(draft.cfg, draft.cfg.device, 1, capacity)
    sequence: list[int] = [*tokens[0].tolist(), int(logits.argmax(-1))]
    eos = set(eos_token_ids)
    stats.new_tokens += 1
    while len(sequence) - pos < max_new_tokens and sequence[-1] not in eos:
        k = min(num_speculative_tokens, max_new_tokens - (len(sequence) - pos) - 1)
        proposals = _propose(draft, draft_cache, sequence, k, tokens.device)
        # The target's cache holds every token but the last; run it and the proposals.
        verify = torch.tensor([[sequence[-1], *proposals]], device=tokens.device)
        # Every token here is real, an EOS among the proposals too: no mask is inferred.
        real = torch.ones_like(verify)
        logits_v = target(verify, past_kv_cache=target_cache, attention_mask=real)
        choices = logits_v[0].argmax(-1).tolist()
        accepted = 0
        while accepted < k and proposals[accepted] == choices[accepted]:
            accepted += 1
        new = [*proposals[:accepted], choices[accepted]]
        for i, token in enumerate(new):
            if token in eos:
                new = new[: i + 1]
                break
        sequence.extend(new)
        target_cache.crop(len(sequence) - 1)
        if draft_cache.seq_len > len(sequence) - 1:
            draft_cache.crop(len(sequence) - 1)
        stats.rounds += 1
        stats.proposed += k
        stats.accepted += accepted
        stats.new_tokens += len(new)
    return torch.tensor([sequence[pos:]], device=tokens.device)


def _propose(
    draft: HookedTransformer,
    cache: KeyValueCache,
    sequence: list[int],
    k: int,
    device: torch.device,
) -> list[int]:
    """``k`` greedy proposals of ``draft`` after ``sequence``; its cache catches up first.

    The draft's cache may lag behind ``sequence`` (the tokens the target added, and the last
    proposal of a fully accepted round); the first forward pass runs all the missing tokens.
    """
    proposals: list[int] = []
    pending = sequence[cache.seq_len :]
    for _ in range(k):
        feed = torch.tensor([pending], device=device)
        token = int(last_position_logits(draft, feed, None, cache).argmax(-1))
        proposals.append(token)
        pending = [token]
    return proposals


def _check(
    target: HookedTransformer,
    draft: HookedTransformer,
    tokens: Tensor,
    max_new_tokens: int,
    num_speculative_tokens: int,
) -> None:
    if tokens.ndim != 2 or tokens.shape[0] != 1:
        raise ValueError(
            f"speculative decoding takes one row [1, pos], got shape {tuple(tokens.shape)}"
        )
    if num_speculative_tokens < 1:
        raise ValueError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
    if draft.cfg.d_vocab != target.cfg.d_vocab:
        raise ValueError(
            f"the draft model's vocabulary has {draft.cfg.d_vocab} tokens, the target's "
            f"{target.cfg.d_vocab}: they must share one"
        )
    total = tokens.shape[1] + max_new_tokens
    for name, model in (("target", target), ("draft", draft)):
        if total > model.cfg.n_ctx:
            raise ValueError(
                f"the prompt plus max_new_tokens is {total} tokens, over the {name} model's "
                f"context n_ctx={model.cfg.n_ctx}"
            )
