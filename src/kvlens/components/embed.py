"""Token embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from kvlens.components.quantizable import Quantizable
from kvlens.config import ModelConfig


class Embed(Quantizable):
    """Token ids to residual vectors: ``W_E[tokens]``.

    In a quantized model ``W_E`` may be held as blocks, one block row per token
    (:mod:`kvlens.components.quantizable`): a token's vector is its row, dequantized exactly.

    Attributes:
        W_E: ``[d_vocab, d_model]``.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model, dtype=cfg.dtype))

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        held = self.quantized_weights.get("W_E")
        if held is None:
            return F.embedding(tokens, self.W_E)
        return held.rows(tokens.reshape(-1)).view(*tokens.shape, held.d_in)
