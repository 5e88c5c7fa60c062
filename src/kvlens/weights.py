"""TransformerLens's weight shortcuts on the model: stacked weights, circuits, composition."""

from __future__ import annotations

from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from kvlens.factored_matrix import FactoredMatrix, composition_scores


class _Stacked:
    """A per-block weight stacked over blocks, e.g. ``model.W_Q: [n_layers, head_index, ...]``.

    A block without it gives ``None`` for the whole stack, unless ``width`` names the config
    field of a bias's width: a missing bias is then zeros of that width (TransformerLens's
    biases are always there, zero when the checkpoint has none).
    """

    def __init__(self, path: str, width: str | None = None) -> None:
        self.path = path.split(".")
        self.width = width

    def __get__(self, model: Any, owner: type) -> Any:
        if model is None:
            return self
        parts: list[Any] = []
        for block in model.blocks:
            part = _get_path(block, self.path)
            if part is None and self.width is not None:
                like = next(block.parameters())
                part = like.new_zeros(getattr(model.cfg, self.width))
            parts.append(part)
        return None if any(p is None for p in parts) else torch.stack(parts)


def _get_path(obj: Any, path: list[str]) -> Any:
    for name in path:
        obj = getattr(obj, name, None)
    return obj


class WeightsMixin:
    """TransformerLens's names for the model's weights, with its shapes.

    Stacked weights are new tensors (``torch.stack`` copies): edit a block's own views
    (``model.blocks[i].attn.W_Q``) to change the model. Biases the checkpoint lacks are zeros,
    which change nothing when edited. Under grouped-query attention ``W_K``, ``W_V``, ``b_K``,
    ``b_V`` are repeated to one per query head, as TransformerLens gives them.
    """

    cfg: Any
    blocks: Any
    embed: Any
    pos_embed: Any
    unembed: Any

    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        return self.embed.W_E

    @property
    def W_pos(self) -> Float[Tensor, "n_ctx d_model"]:
        """The learned positional embedding (models with rotary positions have none)."""
        return self.pos_embed.W_pos

    @property
    def W_E_pos(self) -> Float[Tensor, "d_vocab_plus_n_ctx d_model"]:
        """``W_E`` and ``W_pos`` stacked: a basis of every input to the residual stream.

        Like TransformerLens's, it exists only with learned positions: on a rotary model it
        raises ``AttributeError``.
        """
        return torch.cat([self.W_E, self.W_pos], dim=0)

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.unembed.W_U

    @property
    def b_U(self) -> Float[Tensor, " d_vocab"]:
        """The unembedding bias, or zeros when the model has none."""
        b_U = self.unembed.b_U
        return self.unembed.new_zeros("W_U", self.cfg.d_vocab) if b_U is None else b_U

    W_Q = _Stacked("attn.W_Q")
    W_K = _Stacked("attn.W_K")
    W_V = _Stacked("attn.W_V")
    W_O = _Stacked("attn.W_O")
    b_Q = _Stacked("attn.b_Q")
    b_K = _Stacked("attn.b_K")
    b_V = _Stacked("attn.b_V")
    b_O = _Stacked("attn.b_O", width="d_model")
    W_in = _Stacked("mlp.W_in")
    W_gate = _Stacked("mlp.W_gate")
    W_out = _Stacked("mlp.W_out")
    b_in = _Stacked("mlp.b_in", width="d_mlp_resolved")
    b_out = _Stacked("mlp.b_out", width="d_model")

    @property
    def QK(self) -> FactoredMatrix:
        """Every head's QK circuit, ``[n_layers, head_index, d_model, d_model]``, factored."""
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        """Every head's OV circuit, ``[n_layers, head_index, d_model, d_model]``, factored."""
        return FactoredMatrix(self.W_V, self.W_O)

    def all_head_labels(self) -> list[str]:
        """``"L{layer}H{head}"`` for every attention head, layer by layer."""
        return [f"L{i}H{h}" for i in range(self.cfg.n_layers) for h in range(self.cfg.n_heads)]

    def accumulated_bias(
        self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True
    ) -> Float[Tensor, " d_model"]:
        """The sum of the output biases written to the residual stream before ``layer``.

        Args:
            layer: In ``[0, n_layers]``: the biases of the blocks before this one (0: none).
            mlp_input: Also add block ``layer``'s attention output bias (up to its MLP's input).
            include_mlp_biases: Add the MLPs' output biases too.
        """
        if mlp_input and layer >= self.cfg.n_layers:
            raise ValueError(
                f"mlp_input=True needs layer < n_layers ({self.cfg.n_layers}), got {layer}"
            )
        total = self.embed.new_zeros("W_E", self.cfg.d_model)
        for i in range(layer + 1 if mlp_input else layer):
            block = self.blocks[i]
            biases = [block.attn.b_O]
            if include_mlp_biases and i < layer:
                biases.append(block.mlp.b_out)
            for bias in biases:
                if bias is not None:
                    total = total + bias.to(total.device)
        return total

    def all_composition_scores(
        self, mode: Literal["Q", "K", "V"]
    ) -> Float[Tensor, "n_layers head_index n_layers head_index"]:
        """The composition score of every pair of heads, ``[L1, H1, L2, H2]``.

        How much head ``(L2, H2)``'s query (``"Q"``), key (``"K"``) or value (``"V"``) input
        reads what head ``(L1, H1)`` writes (A Mathematical Framework for Transformer Circuits);
        zero unless ``L1 < L2``.
        """
        if mode == "Q":
            right = self.QK
        elif mode == "K":
            right = self.QK.T
        elif mode == "V":
            right = self.OV
        else:
            raise ValueError(f"mode must be 'Q', 'K' or 'V', got {mode!r}")
        scores = composition_scores(self.OV, right, broadcast_dims=True)
        layers = torch.arange(self.cfg.n_layers, device=scores.device)
        later = layers[:, None, None, None] < layers[None, None, :, None]
        return torch.where(later, scores, torch.zeros_like(scores))
