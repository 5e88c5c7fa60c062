"""One transformer block: attention and MLP around the residual stream."""

from __future__ import annotations

import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from torch.nn.modules import module as torch_module

from kvlens.cache.entry import KeyValueCacheEntry
from kvlens.cache.shared import SharedPrefixEntry
from kvlens.components.attention import Attention
from kvlens.components.attention_context import AttentionContext
from kvlens.components.mlp import MLP, GatedMLP, activation, make_mlp
from kvlens.components.norm import LayerNorm, RMSNorm, make_norm
from kvlens.config import ModelConfig
from kvlens.hooks import HookPoint
from kvlens.kernels import ACTIVATIONS
from kvlens.kernels.layer import LayerKind, LayerWeights, decode_layer


class TransformerBlock(nn.Module):
    """Pre-norm block: ``resid + attn(ln1(resid))`` then ``+ mlp(ln2(.))``.

    With ``cfg.parallel_attn_mlp`` (GPT-NeoX) both read ``resid_pre`` and add in parallel:
    ``resid_post = resid_pre + attn_out + mlp_out``. Such a block has no ``hook_resid_mid``
    (nor has TransformerLens's).

    A decode step (one new token per row, a plain cache entry) of a block with no hook attached
    runs as one native call (:func:`kvlens.kernels.layer.decode_layer`), bitwise equal to the
    op-by-op path that hooks see.
    """

    def __init__(self, cfg: ModelConfig, block_index: int) -> None:
        super().__init__()
        self.block_index = block_index
        self.parallel = cfg.parallel_attn_mlp
        self.ln1 = make_norm(cfg)
        self.attn = Attention(cfg, block_index)
        self.ln2 = make_norm(cfg)
        self.mlp = make_mlp(cfg)
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.hook_attn_out = HookPoint()  # [batch, pos, d_model]
        if not self.parallel:
            self.hook_resid_mid = HookPoint()  # [batch, pos, d_model]
        self.hook_mlp_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_post = HookPoint()  # [batch, pos, d_model]
        self.rotary_adjacent_pairs = cfg.rotary_adjacent_pairs
        self._native_parts: tuple[nn.Module, ...] = ()  # the submodules last seen
        self._native_points: tuple[HookPoint, ...] = ()  # and the block's hook points then

    def forward(
        self,
        resid_pre: Float[Tensor, "batch pos d_model"],
        ctx: AttentionContext,
        cache_entry: KeyValueCacheEntry | SharedPrefixEntry | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """Run the block on the new tokens; ``cache_entry`` (if any) gets their keys and values."""
        if type(cache_entry) is KeyValueCacheEntry and resid_pre.shape[1] == 1:
            out = self._decode_natively(resid_pre, ctx, cache_entry)
            if out is not None:
                return out
        resid_pre = self.hook_resid_pre(resid_pre)
        attn_out = self.hook_attn_out(self.attn(self.ln1(resid_pre), ctx, cache_entry))
        if self.parallel:
            mlp_out = self.hook_mlp_out(self.mlp(self.ln2(resid_pre)))
            return self.hook_resid_post(resid_pre + attn_out + mlp_out)
        resid_mid = self.hook_resid_mid(resid_pre + attn_out)
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(resid_mid)))
        return self.hook_resid_post(resid_mid + mlp_out)

    def _decode_natively(
        self,
        resid_pre: Float[Tensor, "batch 1 d_model"],
        ctx: AttentionContext,
        entry: KeyValueCacheEntry,
    ) -> Float[Tensor, "batch 1 d_model"] | None:
        """The block as one native call, or ``None`` if anything calls for the op-by-op path.

        That path is taken when a hook (a hook point's or a torch module hook) could observe an
        activation, when a part is not one kvlens builds (a replaced submodule or activation) or
        when the kernel declines the input.
        """
        parts = self._modules
        ln1, attn, ln2, mlp = parts["ln1"], parts["attn"], parts["ln2"], parts["mlp"]
        kind = _layer_kind(ln1, ln2, mlp, self.parallel)
        if (
            kind is None
            or ln1 is None
            or ln2 is None
            or mlp is None
            or type(attn) is not Attention
            or ctx.is_causal
            or torch_module._global_forward_hooks
            or torch_module._global_forward_pre_hooks
        ):
            return None
        if (ln1, attn, ln2, mlp) != self._native_parts:
            self._native_parts = (ln1, attn, ln2, mlp)
            self._native_points = tuple(m for m in self.modules() if isinstance(m, HookPoint))
        for part in self._native_parts:
            if part._forward_hooks or part._forward_pre_hooks:
                return None
        for point in self._native_points:
            if point.is_observed:
                return None
        if entry.n_kv_heads != attn.n_kv_heads or entry.d_head != attn.d_head:
            return None  # the op-by-op path raises the error
        if entry.batch_size != resid_pre.shape[0]:
            return None
        rotary = None
        if attn.rotary:
            if ctx.rotary_cos is None or ctx.rotary_sin is None:
                return None
            rotary = (ctx.rotary_cos, ctx.rotary_sin, self.rotary_adjacent_pairs)
        a, m = attn._parameters, mlp._parameters
        n1, n2 = ln1._parameters, ln2._parameters
        weights = LayerWeights(
            n1["w"],
            n1.get("b"),
            a["W_QKV"],
            a.get("b_QKV"),
            a["W_O_flat"],
            a.get("b_O"),
            n2["w"],
            n2.get("b"),
            m.get("W_gate_in") if kind.act is None else m.get("W_in"),
            m.get("b_gate_in") if kind.act is None else m.get("b_in"),
            m["W_out"],
            m.get("b_out"),
        )
        keys, values, pos = entry.claim(1)
        out = decode_layer(
            resid_pre, weights, kind, attn.n_heads, attn.d_head, keys, values, pos,
            ctx.attn_mask, rotary,
        )  # fmt: skip
        if out is not None:
            entry.commit(1)
        return out


def _layer_kind(
    ln1: nn.Module | None, ln2: nn.Module | None, mlp: nn.Module | None, parallel: bool
) -> LayerKind | None:
    """The native layer's description of these parts, or ``None`` if it cannot run them."""
    if type(ln1) is RMSNorm and type(ln2) is RMSNorm:
        layer_norm, eps, eps2 = False, ln1.eps, ln2.eps
    elif type(ln1) is LayerNorm and type(ln2) is LayerNorm:
        layer_norm, eps, eps2 = True, ln1.eps, ln2.eps
    else:
        return None
    if eps != eps2:
        return None
    if type(mlp) is GatedMLP:
        return LayerKind(layer_norm, None, parallel, eps) if mlp.act is F.silu else None
    if type(mlp) is MLP:
        act = ACTIVATIONS.get(mlp.act_fn)
        if act is None or mlp.act is not activation(mlp.act_fn):
            return None
        return LayerKind(layer_norm, act, parallel, eps)
    return None
