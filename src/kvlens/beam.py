"""Beam search over the key-value cache, reordered in place with ``KeyValueCache.select``.

Hugging Face's semantics (``transformers`` 4.57, ``do_sample=False``), so that both give the same
tokens: each step keeps the ``2 * num_beams`` best continuations of all beams by summed
log-probability; those ending in EOS among the first ``num_beams`` become finished hypotheses,
scored ``sum_logprobs / generated_length ** length_penalty``; the ``num_beams`` best unfinished
ones continue. At ``max_new_tokens`` every continuation finishes. ``early_stopping`` decides when
the search stops before that: ``True`` once ``num_beams`` hypotheses are finished, ``False`` when
the best running beam, scored at its current length, cannot beat the worst finished one
(Hugging Face's default heuristic), ``"never"`` with the exact bound.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Int
from torch import Tensor

from kvlens.decode import decode_step, run_prompt
from kvlens.generation_config import EarlyStopping

if TYPE_CHECKING:
    from kvlens.model import HookedTransformer

_MASKED = -1.0e9


@dataclass
class BeamHypothesis:
    """A finished sequence of new tokens and its length-penalised score."""

    tokens: Int[Tensor, " new"]
    score: float


@torch.no_grad()
def beam_search(
    model: HookedTransformer,
    tokens: Int[Tensor, "1 pos"],
    max_new_tokens: int,
    num_beams: int,
    length_penalty: float = 1.0,
    eos_token_ids: Sequence[int] = (),
    early_stopping: EarlyStopping = False,
) -> BeamHypothesis:
    """The best continuation of ``tokens`` (one row) found by beam search.

    Args:
        model: The model.
        tokens: The prompt, ``[1, pos]``.
        max_new_tokens: Tokens to add at most (>= 1).
        num_beams: Beams kept each step (>= 1).
        length_penalty: Exponent of the length that divides a hypothesis's summed log-probability.
        eos_token_ids: Tokens that finish a hypothesis.
        early_stopping: ``True``, ``False`` or ``"never"``, as in Hugging Face.

    Returns:
        The best finished hypothesis (its new tokens, EOS included, and its score).
    """
    if tokens.ndim != 2 or tokens.shape[0] != 1:
        raise ValueError(f"beam search takes one row [1, pos], got shape {tuple(tokens.shape)}")
    if num_beams < 1 or max_new_tokens < 1:
        raise ValueError(
            f"num_beams and max_new_tokens must be >= 1, got {num_beams} and {max_new_tokens}"
        )
    device = tokens.device
    pos = tokens.shape[1]
    logits, cache = run_prompt(model, tokens, capacity=pos + max_new_tokens)
    eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=device)
    keep = max(2, 1 + len(eos_token_ids)) * num_beams
    running_scores = torch.full((num_beams,), _MASKED, device=device)
    running_scores[0] = 0.0  # all beams start equal: only the first may expand at step 0
    running = torch.zeros((num_beams, 0), dtype=torch.long, device=device)
    finished: list[BeamHypothesis] = []
    improvable = True
    for step in range(max_new_tokens):
        log_probs = torch.log_softmax(logits.float(), dim=-1).expand(num_beams, -1)
        vocab = log_probs.shape[-1]
        summed = (log_probs + running_scores[:, None]).reshape(-1)
        scores, flat = summed.topk(min(keep, summed.numel()))
        beams, new_tokens = flat // vocab, flat % vocab
        candidates = torch.cat([running[beams], new_tokens[:, None]], dim=1)
        if step == max_new_tokens - 1:
            ends = torch.ones_like(new_tokens, dtype=torch.bool)
        else:
            ends = torch.isin(new_tokens, eos)
        if improvable:
            denominator = (step + 1) ** length_penalty
            _add_finished(finished, candidates, scores, ends, num_beams, denominator)
        if bool(ends.all()):
            break
        masked = torch.where(ends, scores + _MASKED, scores)
        order = masked.topk(num_beams).indices
        running, running_scores = candidates[order], masked[order]
        improvable = (
            len(finished) < num_beams
            or _best_possible(
                float(running_scores[0]), step + 1, max_new_tokens, length_penalty, early_stopping
            )
            > finished[-1].score
        )
        if not improvable or (early_stopping is True and len(finished) == num_beams):
            break
        cache.select(beams[order])
        logits = decode_step(model, running[:, -1], cache)
    return finished[0]


def _add_finished(
    finished: list[BeamHypothesis],
    candidates: Tensor,
    scores: Tensor,
    ends: Tensor,
    num_beams: int,
    denominator: float,
) -> None:
    """Add the ending candidates ranked in the first ``num_beams``; keep the ``num_beams`` best."""
    for rank in range(min(num_beams, len(candidates))):
        if bool(ends[rank]):
            finished.append(BeamHypothesis(candidates[rank], float(scores[rank]) / denominator))
    finished.sort(key=lambda h: h.score, reverse=True)
    del finished[num_beams:]


def _best_possible(
    running_score: float,
    length: int,
    max_new_tokens: int,
    length_penalty: float,
    early_stopping: EarlyStopping,
) -> float:
    """The score Hugging Face assumes the best running beam may still reach."""
    best_length = max_new_tokens if early_stopping == "never" and length_penalty > 0 else length
    return running_score / best_length**length_penalty
