"""A block's decode plan: the fused native layer's arguments, built once and reused every token.

:func:`make_plan` asks the block's parts what they are (their ``native()`` descriptions,
:mod:`kvlens.components.native`) and whether any hook could observe them, and returns a
:class:`DecodePlan`, or ``None`` with the reason recorded when the block must run op by op. The
block keeps the plan until a structural change (a hook added or removed, a submodule, parameter or
attribute replaced; :mod:`kvlens.structure`) makes it rebuild it. Per token, :meth:`DecodePlan.run`
only checks the input (the kernel's own limits are checked by :func:`decode_layer`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from jaxtyping import Float
from torch import Tensor

from kvlens.cache.entry import AttentionEntry
from kvlens.components.attention_context import AttentionContext
from kvlens.components.attention_rules import window_start
from kvlens.components.native import NativeAttention
from kvlens.hook_point import HookPoint
from kvlens.kernels.layer import LayerKind, LayerWeights, PreparedLayer, decode_layer, prepare_layer
from kvlens.structure import WatchedModule

if TYPE_CHECKING:
    from kvlens.components.block import TransformerBlock


class DecodePlan(NamedTuple):
    """The fused native layer's weights and kind for one block."""

    weights: LayerWeights
    kind: LayerKind
    attn: NativeAttention
    prepared: PreparedLayer | None  # the weights checked once (None: the kernel declines them)

    def run(
        self,
        resid_pre: Float[Tensor, "batch 1 d_model"],
        ctx: AttentionContext,
        entry: AttentionEntry,
    ) -> Float[Tensor, "batch 1 d_model"] | None:
        """The block's output for one new token per row, or ``None`` (nothing written) where
        the input calls for the op-by-op path (which then raises any error)."""
        attn = self.attn
        if entry.batch_size != resid_pre.shape[0]:
            return None
        if entry.n_kv_heads != attn.n_kv_heads or entry.d_head != attn.d_head:
            return None
        rotary = None
        if attn.rotary:
            if ctx.rotary_cos is None or ctx.rotary_sin is None:
                return None
            rotary = (ctx.rotary_cos, ctx.rotary_sin, attn.rotary_adjacent_pairs)
        claimed = entry.claim(1)
        if claimed is None:
            return None
        keys, values, pos = claimed
        mask, _ = ctx.own_mask(None)
        if mask is not None and entry.start:
            mask = mask[..., entry.start :]  # positions a bounded entry dropped
        first = window_start(pos + 1, attn.window)
        out = decode_layer(
            resid_pre, self.weights, self.kind, attn.n_heads, attn.d_head, keys, values, pos,
            mask, rotary, scale=attn.scale, first=first, prepared=self.prepared,
        )  # fmt: skip
        if out is not None:
            entry.commit(1)
        return out


def make_plan(block: TransformerBlock) -> DecodePlan | str:
    """The block's plan, or why it runs op by op (a sentence, for ``block.decode_plan_reason``)."""
    if block.use_post_norms:
        return "norms after attention and the MLP (use_normalization_before_and_after)"
    parts = {name: getattr(block, name, None) for name in ("ln1", "attn", "ln2", "mlp")}
    described = {}
    for name, part in parts.items():
        native = getattr(part, "native", None)
        description = native() if callable(native) else None
        if description is None:
            return f"{name} has no native form ({type(part).__name__})"
        described[name] = description
    ln1, attn, ln2, mlp = described["ln1"], described["attn"], described["ln2"], described["mlp"]
    if ln1.layer_norm != ln2.layer_norm or ln1.eps != ln2.eps:
        return "its two norms differ in kind or epsilon"
    for name, part in parts.items():
        if not isinstance(part, WatchedModule):
            return f"{name} is not a kvlens module (its changes would go unseen)"
        if part.has_torch_forward_hooks:
            return f"a torch forward hook on {name}"
    # The block's input and output hook points run around the native call (TransformerBlock).
    boundary = (block.hook_resid_pre, block.hook_resid_post)
    for module in block.modules():
        if isinstance(module, HookPoint) and module.attached and module not in boundary:
            return f"a hook on {module.name or 'one of its hook points'}"
    weights = LayerWeights(
        ln1.w, ln1.b, attn.w_qkv, attn.b_qkv, attn.w_o, attn.b_o, ln2.w, ln2.b,
        mlp.w_in, mlp.b_in, mlp.w_out, mlp.b_out,
    )  # fmt: skip
    kind = LayerKind(ln1.layer_norm, mlp.act, block.parallel, ln1.eps)
    prepared = prepare_layer(weights, kind, attn.n_heads, attn.d_head)
    return DecodePlan(weights, kind, attn, prepared)
