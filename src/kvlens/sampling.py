"""Choosing the next token from logits: greedy, temperature, top-k, top-p, frequency penalty."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen (TransformerLens's ``generate`` arguments).

    Attributes:
        do_sample: Sample; ``False`` picks the most likely token (greedy).
        temperature: Divides the logits; ``0`` means greedy.
        top_k: Keep only the ``top_k`` most likely tokens.
        top_p: Keep the smallest set of tokens whose probability adds up to ``top_p``.
        freq_penalty: Subtract ``freq_penalty * count`` from each token's logit, counting the
            token's occurrences in the sequence so far.
    """

    do_sample: bool = True
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    freq_penalty: float = 0.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be a positive int or None, got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.freq_penalty >= 0:
            raise ValueError(f"freq_penalty must be >= 0, got {self.freq_penalty}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


def sample_logits(
    logits: Float[Tensor, "batch d_vocab"],
    cfg: SamplingConfig,
    counts: Float[Tensor, "batch d_vocab"] | None = None,
    generator: torch.Generator | None = None,
) -> Int[Tensor, " batch"]:
    """The next token of each row.

    Args:
        logits: Last-position logits.
        cfg: Sampling settings.
        counts: Occurrences of each token so far, for the frequency penalty.
        generator: Random generator for reproducible sampling.
    """
    if cfg.greedy:
        return logits.argmax(dim=-1)
    logits = logits.float() / cfg.temperature
    if cfg.freq_penalty > 0 and counts is not None:
        logits = logits - cfg.freq_penalty * counts
    if cfg.top_k is not None and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= cfg.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
