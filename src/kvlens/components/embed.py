"""Token embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from kvlens.config import ModelConfig
from kvlens.structure import WatchedModule


class Embed(WatchedModule):
    """Token ids to residual vectors: ``W_E[tokens]``.

    Attributes:
        W_E: ``[d_vocab, d_model]``.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model, dtype=cfg.dtype))

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        return F.embedding(tokens, self.W_E)
