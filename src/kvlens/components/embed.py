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

    block_matrices = ("W_E",)
    blocks_transposed = False

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model, dtype=cfg.dtype))

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        if "W_E" not in self._quantized:
            return F.embedding(tokens, self.W_E)
        blocks = self._matrix("W_E")
        return blocks.rows(tokens.reshape(-1)).view(*tokens.shape, blocks.d_in)
