"""One transformer block: attention and MLP around the residual stream."""

from __future__ import annotations

from jaxtyping import Float
from torch import Tensor

from kvlens import structure
from kvlens.cache.entry import AttentionEntry
from kvlens.components.attention import Attention
from kvlens.components.attention_context import AttentionContext
from kvlens.components.decode_plan import DecodePlan, make_plan
from kvlens.components.mlp import make_mlp
from kvlens.components.norm import make_norm
from kvlens.config import ModelConfig
from kvlens.hook_point import global_hooks
from kvlens.hooks import HookPoint
from kvlens.structure import WatchedModule


class TransformerBlock(WatchedModule):
    """Pre-norm block: ``resid + attn(ln1(resid))`` then ``+ mlp(ln2(.))``.

    With ``cfg.parallel_attn_mlp`` (GPT-NeoX) both read ``resid_pre`` and add in parallel:
    ``resid_post = resid_pre + attn_out + mlp_out``. Such a block has no ``hook_resid_mid``
    (nor has TransformerLens's). With ``cfg.use_normalization_before_and_after`` (Gemma 2),
    ``ln1_post`` and ``ln2_post`` normalize the attention's and the MLP's outputs before
    ``hook_attn_out`` and ``hook_mlp_out``, as in TransformerLens.

    A decode step (one new token per row) of a block that nothing observes runs as one native
    call (:func:`kvlens.kernels.layer.decode_layer`), bitwise equal to the op-by-op path that hooks
    see. Its arguments are the block's decode plan (:mod:`kvlens.components.decode_plan`), built
    once and rebuilt after a structural change (:mod:`kvlens.structure`);
    :attr:`decode_plan_reason` says why a block has none.
    """

    def __init__(self, cfg: ModelConfig, block_index: int) -> None:
        super().__init__()
        self.block_index = block_index
        self.parallel = cfg.parallel_attn_mlp
        self.use_post_norms = cfg.use_normalization_before_and_after
        self.ln1 = make_norm(cfg)
        self.attn = Attention(cfg, block_index)
        self.ln2 = make_norm(cfg)
        self.mlp = make_mlp(cfg)
        if self.use_post_norms:
            self.ln1_post = make_norm(cfg)
            self.ln2_post = make_norm(cfg)
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.hook_attn_out = HookPoint()  # [batch, pos, d_model]
        if not self.parallel:
            self.hook_resid_mid = HookPoint()  # [batch, pos, d_model]
        self.hook_mlp_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_post = HookPoint()  # [batch, pos, d_model]
        self._plan: DecodePlan | str = ""
        self._plan_generation = -1

    @property
    def decode_plan(self) -> DecodePlan | None:
        """The fused native layer's plan for this block as it is now, or ``None``."""
        if self._plan_generation != structure.generation():
            self._plan = make_plan(self)
            self._plan_generation = structure.generation()
        return self._plan if isinstance(self._plan, DecodePlan) else None

    @property
    def decode_plan_reason(self) -> str | None:
        """Why a decode step of this block runs op by op, or ``None`` if it runs natively."""
        return None if self.decode_plan is not None else str(self._plan)

    def forward(
        self,
        resid_pre: Float[Tensor, "batch pos d_model"],
        ctx: AttentionContext,
        cache_entry: AttentionEntry | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """Run the block on the new tokens; ``cache_entry`` (if any) gets their keys and values."""
        if cache_entry is not None and resid_pre.shape[1] == 1:
            plan = self.decode_plan
            if plan is not None and not global_hooks():
                out = plan.run(resid_pre, ctx, cache_entry)
                if out is not None:
                    return out
        resid_pre = self.hook_resid_pre(resid_pre)
        attn_out = self.attn(self.ln1(resid_pre), ctx, cache_entry)
        if self.use_post_norms:
            attn_out = self.ln1_post(attn_out)
        attn_out = self.hook_attn_out(attn_out)
        if self.parallel:
            mlp_out = self.hook_mlp_out(self._mlp(self.ln2(resid_pre)))
            return self.hook_resid_post(resid_pre + attn_out + mlp_out)
        resid_mid = self.hook_resid_mid(resid_pre + attn_out)
        mlp_out = self.hook_mlp_out(self._mlp(self.ln2(resid_mid)))
        return self.hook_resid_post(resid_mid + mlp_out)

    def _mlp(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        out = self.mlp(x)
        return self.ln2_post(out) if self.use_post_norms else out
