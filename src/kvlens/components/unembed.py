"""Unembedding: residual stream to logits."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn

from kvlens.components.linear import linear
from kvlens.components.quantizable import Quantizable
from kvlens.config import ModelConfig


class Unembed(Quantizable):
    """Residual vectors to logits: ``x @ W_U (+ b_U)``.

    ``W_U`` is its own contiguous ``[d_model, d_vocab]`` parameter even for models whose checkpoint
    ties it to the embedding (as TransformerLens does on load): the transposed view of ``W_E``
    would make the largest matmul of a decode step read memory with a stride. Editing ``W_E``
    therefore does not change ``W_U``. In a quantized model whose file ties them, both are one
    set of blocks (:mod:`kvlens.components.quantizable`), read as ``[d_vocab, d_model]`` rows.

    With ``cfg.output_logits_soft_cap = c > 0`` (Gemma 2) the logits are ``c * tanh(logits / c)``,
    as TransformerLens and Hugging Face compute them.

    Attributes:
        W_U: ``[d_model, d_vocab]``.
        b_U: ``[d_vocab]``, only when ``cfg.unembed_bias`` (else ``None``).
        soft_cap: ``c``, or ``None``.
    """

    block_matrices = ("W_U",)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.W_U = nn.Parameter(torch.empty(cfg.d_model, cfg.d_vocab, dtype=cfg.dtype))
        self.b_U = (
            nn.Parameter(torch.zeros(cfg.d_vocab, dtype=cfg.dtype)) if cfg.unembed_bias else None
        )
        cap = cfg.output_logits_soft_cap
        self.soft_cap = float(cap) if cap > 0 else None

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_vocab"]:
        logits = linear(x, self.stored_weight("W_U"), self.b_U)
        if self.soft_cap is None:
            return logits
        return torch.tanh(logits / self.soft_cap) * self.soft_cap
