"""TransformerLens's weight processing: fold the norms, center, fold the value biases, refactor.

Each step leaves the model's function alone (``center_unembed`` shifts every logit of a position
by the same amount, so log-probabilities stay) and makes the weights easier to read. The steps,
their names and their rules are TransformerLens 2.18's (``HookedTransformer.process_weights_``):

- ``fold_ln``: each norm's scale (and a LayerNorm's bias) moves into the weights that read it:
  ``ln1`` into the query, key and value projections, ``ln2`` into the MLP's input (and gate),
  ``ln_final`` into the unembedding. After a LayerNorm the reading weights are centered too (its
  output has mean zero). Gemma 2's norms after attention and the MLP stay as they are.
- ``center_writing_weights`` (LayerNorm models only, as in TransformerLens): every weight and
  bias writing to the residual stream (``W_E``, ``W_pos``, ``W_O``, ``b_O``, ``W_out``,
  ``b_out``) gets mean zero over ``d_model``, which the next LayerNorm removes anyway.
- ``center_unembed``: ``W_U`` and ``b_U`` get mean zero over the vocabulary.
- ``fold_value_biases``: ``b_V`` moves into ``b_O`` (attention patterns sum to 1).
- ``refactor_factored_attn_matrices``: the QK and OV circuits are factored anew by SVD.

TransformerLens replaces a folded norm by ``LayerNormPre``/``RMSNormPre``; kvlens keeps the norm
modules with ``w = 1`` (and ``b = 0``), which compute the same numbers (multiplying by 1 and adding
0 are exact), keep TransformerLens's hook names and shapes and keep the fused native decode
layer in use. ``cfg.normalization_type`` stays ``"LN"``/``"RMS"``; what was applied is recorded
as ``model.weight_processing``. A bias that processing makes non-zero where the checkpoint had
none (a LayerNorm's bias folded into the unembedding, say) is created, and the matching
``cfg`` flag (``attn_qkv_bias``, ``attn_out_bias``, ``mlp_bias``, ``unembed_bias``) turned on.

Deliberate differences from TransformerLens: ``center_unembed`` is skipped (with a warning) on a
model whose logits are soft-capped wherever it is asked for, not only in ``from_pretrained``
(soft-capping does not commute with the shift); skipped steps are logged at INFO level, not as
warnings; a gated MLP after a LayerNorm gets the norm
folded into its gate as well as its input. The arithmetic runs in float32 (float64 for float64
weights) and is rounded once to the weights' dtype.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from kvlens.factored_matrix import FactoredMatrix

if TYPE_CHECKING:
    from kvlens.components.attention import Attention
    from kvlens.components.norm import LayerNorm, RMSNorm
    from kvlens.model import HookedTransformer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightProcessing:
    """Which of TransformerLens's processing steps a model's weights have been through."""

    fold_ln: bool = False
    center_writing_weights: bool = False
    center_unembed: bool = False
    fold_value_biases: bool = False
    refactor_factored_attn_matrices: bool = False

    def __or__(self, other: WeightProcessing) -> WeightProcessing:
        """Both sets of steps: what a model processed twice has been through."""
        return WeightProcessing(
            **{
                f.name: getattr(self, f.name) or getattr(other, f.name)
                for f in dataclasses.fields(self)
            }
        )

    @property
    def any(self) -> bool:
        """Whether any step was applied."""
        return any(dataclasses.astuple(self))


def process_weights_(model: HookedTransformer, steps: WeightProcessing) -> WeightProcessing:
    """Apply ``steps`` to ``model``'s weights in place and return the steps actually applied.

    Steps that do not apply are skipped, as in TransformerLens: ``center_writing_weights`` on an
    RMSNorm model, ``center_unembed`` on a model with soft-capped logits. TransformerLens warns;
    kvlens logs at INFO level (``from_pretrained``'s defaults ask for them on every RMSNorm
    model, and the CLI's stderr stays clean) and leaves them out of the steps it returns.

    Raises:
        ValueError: ``refactor_factored_attn_matrices`` on a rotary or grouped-query model (the
            QK circuit depends on the positions; TransformerLens refuses it too).
    """
    cfg = model.cfg
    layer_norm = cfg.normalization_type == "LN"
    if steps.refactor_factored_attn_matrices and (
        cfg.positional_embedding_type == "rotary" or cfg.n_key_value_heads is not None
    ):
        raise ValueError(
            "refactor_factored_attn_matrices needs learned positions and multi-head attention, "
            f"got positional_embedding_type={cfg.positional_embedding_type!r}, "
            f"n_key_value_heads={cfg.n_key_value_heads}"
        )
    if steps.center_writing_weights and not layer_norm:
        logger.info("center_writing_weights needs LayerNorm (this model uses RMSNorm); skipped")
        steps = dataclasses.replace(steps, center_writing_weights=False)
    if steps.center_unembed and cfg.output_logits_soft_cap > 0:
        logger.info("center_unembed skipped: logit soft-capping is not shift-invariant")
        steps = dataclasses.replace(steps, center_unembed=False)
    if steps.fold_ln and cfg.dtype not in (torch.float32, torch.float64):
        logger.info(
            "processing %s weights rounds them again; from_pretrained_no_processing keeps the "
            "checkpoint's",
            cfg.dtype,
        )
    _add_biases(model, steps)
    with torch.no_grad():
        if steps.fold_ln:
            _fold_norms(model)
        if steps.center_writing_weights:
            _center_writing_weights(model)
        if steps.center_unembed:
            _center(model.unembed.W_U, dim=-1)
            _center(model.unembed.b_U, dim=-1)
        if steps.fold_value_biases:
            for block in model.blocks:
                _fold_value_biases(block.attn)
        if steps.refactor_factored_attn_matrices:
            for block in model.blocks:
                _refactor(block.attn)
    model._fingerprint = None  # the weights changed
    return steps


def _add_biases(model: HookedTransformer, steps: WeightProcessing) -> None:
    """Create (as zeros) the biases the steps will write where the model has none."""
    cfg = model.cfg
    fold_biases = steps.fold_ln and cfg.normalization_type == "LN"
    qkv = cfg.attn_qkv_bias or fold_biases or steps.refactor_factored_attn_matrices
    out = cfg.attn_out_bias or (
        qkv and (steps.fold_value_biases or steps.refactor_factored_attn_matrices)
    )
    mlp = cfg.mlp_bias or fold_biases
    unembed = cfg.unembed_bias or (fold_biases and cfg.final_norm)
    for block in model.blocks:
        attn, mlp_module = block.attn, block.mlp
        if qkv and attn.b_QKV is None:
            attn.b_QKV = _zeros_like_columns(attn.W_QKV)
        if out and attn.b_O is None:
            attn.b_O = _zeros_like_columns(attn.W_O_flat)
        if mlp:
            if hasattr(mlp_module, "b_gate_in"):
                if mlp_module.b_gate_in is None:
                    mlp_module.b_gate_in = _zeros_like_columns(mlp_module.W_gate_in)
            elif mlp_module.b_in is None:
                mlp_module.b_in = _zeros_like_columns(mlp_module.W_in)
            if mlp_module.b_out is None:
                mlp_module.b_out = _zeros_like_columns(mlp_module.W_out)
    if unembed and model.unembed.b_U is None:
        model.unembed.b_U = _zeros_like_columns(model.unembed.W_U)
    model.cfg = cfg.replace(
        attn_qkv_bias=qkv, attn_out_bias=out, mlp_bias=mlp, unembed_bias=unembed
    )


def _zeros_like_columns(weight: Tensor) -> nn.Parameter:
    """A zero bias for ``weight``'s output columns, on its device, in its dtype."""
    return nn.Parameter(weight.new_zeros(weight.shape[-1]), requires_grad=weight.requires_grad)


def _work(t: Tensor) -> Tensor:
    """``t`` in the precision the processing computes in."""
    return t.detach().to(torch.float64 if t.dtype == torch.float64 else torch.float32)


def _center(param: Tensor | None, dim: int) -> None:
    """Subtract ``param``'s mean over ``dim`` (nothing for a missing bias)."""
    if param is not None:
        value = _work(param)
        param.copy_(value - value.mean(dim, keepdim=True))


def _fold_norm(
    norm: LayerNorm | RMSNorm, readers: list[tuple[Tensor, Tensor | None]], center: bool
) -> None:
    """Fold ``norm``'s scale and bias into the ``(weight [d_model, out], bias [out])`` pairs
    that read its output, center the weights after a LayerNorm, and make ``norm`` the identity
    after normalizing (``w = 1``, ``b = 0``)."""
    norm_bias: Tensor | None = getattr(norm, "b", None)
    scale = _work(norm.w)
    shift = None if norm_bias is None else _work(norm_bias)
    for weight, bias in readers:
        value = _work(weight)
        if shift is not None:
            assert bias is not None  # created by _add_biases
            bias.copy_(_work(bias) + shift @ value)
        value = value * scale[:, None]
        if center:
            value = value - value.mean(0, keepdim=True)
        weight.copy_(value)
    norm.w.fill_(1.0)
    if norm_bias is not None:
        norm_bias.zero_()


def _fold_norms(model: HookedTransformer) -> None:
    center = model.cfg.normalization_type == "LN"
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        _fold_norm(block.ln1, [(attn.W_QKV, attn.b_QKV)], center)
        if hasattr(mlp, "W_gate_in"):
            _fold_norm(block.ln2, [(mlp.W_gate_in, mlp.b_gate_in)], center)
        else:
            _fold_norm(block.ln2, [(mlp.W_in, mlp.b_in)], center)
    if model.cfg.final_norm:
        _fold_norm(model.ln_final, [(model.unembed.W_U, model.unembed.b_U)], center)


def _center_writing_weights(model: HookedTransformer) -> None:
    _center(model.embed.W_E, dim=-1)
    if model.cfg.positional_embedding_type == "standard":
        _center(model.pos_embed.W_pos, dim=-1)
    for block in model.blocks:
        for param in (block.attn.W_O_flat, block.attn.b_O, block.mlp.W_out, block.mlp.b_out):
            _center(param, dim=-1)


def _fold_value_biases(attn: Attention) -> None:
    """``b_O += sum_h b_V[h] W_O[h]`` and ``b_V = 0``."""
    if attn.b_QKV is None:
        return
    b_V = attn._b_V
    per_head = attn._per_query_head(_work(b_V)).reshape(-1)
    assert attn.b_O is not None  # created by _add_biases
    attn.b_O.copy_(_work(attn.b_O) + per_head @ _work(attn.W_O_flat))
    b_V.zero_()


def _refactor(attn: Attention) -> None:
    """Factor QK as ``(U sqrt(S), sqrt(S) V^T)`` (biases as an extra input row) and OV as
    ``(U S, V^T)``, folding ``b_V`` into ``b_O`` first (TransformerLens's recipe)."""
    assert attn.b_QKV is not None and attn.b_O is not None  # created by _add_biases
    W_Q, W_K, b_Q, b_K = attn.W_Q, attn._W_K, attn.b_Q, attn._b_K
    q_eff = torch.cat([_work(W_Q), _work(b_Q)[:, None, :]], dim=1)
    k_eff = torch.cat([_work(W_K), _work(b_K)[:, None, :]], dim=1)
    q_even, k_even_t = FactoredMatrix(q_eff, k_eff.transpose(-1, -2)).make_even().pair
    k_even = k_even_t.transpose(-1, -2)
    W_Q.copy_(q_even[:, :-1, :])
    b_Q.copy_(q_even[:, -1, :])
    W_K.copy_(k_even[:, :-1, :])
    b_K.copy_(k_even[:, -1, :])
    _fold_value_biases(attn)
    u, s, vh = FactoredMatrix(_work(attn._W_V), _work(attn.W_O)).svd()
    attn._W_V.copy_(u @ s.diag_embed())
    attn.W_O.copy_(vh.transpose(-1, -2))
