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

    A decode step (one new token per row) of a block that nothing inside observes runs as one
    native call (:func:`kvlens.kernels.layer.decode_layer`), bitwise equal to the op-by-op path
    that hooks see. Hooks on the block's input and output (``hook_resid_pre``,
    ``hook_resid_post``) run around that call, so reading or steering the residual stream
    between blocks keeps the native layer. Its arguments are the block's decode plan
    (:mod:`kvlens.components.decode_plan`), built once and rebuilt after a structural change
    (:mod:`kvlens.structure`); :attr:`decode_plan_reason` says why a block has none.

    TransformerLens's hook options (:meth:`set_hook_options`) declare more hook points:
    ``hook_attn_in`` (``use_attn_in``) and ``hook_q_input``, ``hook_k_input``, ``hook_v_input``
    (``use_split_qkv_input``) give each head its own copy of ``resid_pre``, which ``ln1``
    normalizes once for each of the query, key and value inputs (so its hooks fire three times,
    as in TransformerLens); ``hook_mlp_in`` sees a copy of the MLP's input before ``ln2``. The
    options alone leave the fused native layer in use; a hook on one of these points, like any
    hook in the block, makes it run op by op.
    """

    # Declared by set_hook_options only while their option is on.
    hook_attn_in: HookPoint
    hook_q_input: HookPoint
    hook_k_input: HookPoint
    hook_v_input: HookPoint
    hook_mlp_in: HookPoint

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
        self.use_attn_in = self.use_split_qkv_input = self.use_hook_mlp_in = False
        self.set_hook_options(cfg)

    def set_hook_options(self, cfg: ModelConfig) -> None:
        """Declare the hook points ``cfg``'s ``use_*`` options turn on and drop the others
        (with their hooks); see :class:`~kvlens.config.ModelConfig`."""
        self.attn.set_use_attn_result(cfg.use_attn_result)
        self.use_attn_in = cfg.use_attn_in
        self.use_split_qkv_input = cfg.use_split_qkv_input
        self.use_hook_mlp_in = cfg.use_hook_mlp_in
        points = {
            "hook_attn_in": cfg.use_attn_in,  # [batch, pos, head_index, d_model]
            "hook_q_input": cfg.use_split_qkv_input,  # [batch, pos, head_index, d_model]
            "hook_k_input": cfg.use_split_qkv_input,  # [batch, pos, kv_head, d_model]
            "hook_v_input": cfg.use_split_qkv_input,  # [batch, pos, kv_head, d_model]
            "hook_mlp_in": cfg.use_hook_mlp_in,  # [batch, pos, d_model]
        }
        for name, wanted in points.items():
            if wanted and not hasattr(self, name):
                setattr(self, name, HookPoint())
            elif not wanted and hasattr(self, name):
                delattr(self, name)

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
        resid_pre = self.hook_resid_pre(resid_pre)
        if cache_entry is not None and resid_pre.shape[1] == 1:
            plan = self.decode_plan
            if plan is not None and not global_hooks():
                out = plan.run(resid_pre, ctx, cache_entry)
                if out is not None:
                    return self.hook_resid_post(out)
        attn_out = self._attention(resid_pre, ctx, cache_entry)
        if self.use_post_norms:
            attn_out = self.ln1_post(attn_out)
        attn_out = self.hook_attn_out(attn_out)
        if self.parallel:
            mlp_out = self.hook_mlp_out(self._mlp(self.ln2(self._mlp_in(resid_pre))))
            return self.hook_resid_post(resid_pre + attn_out + mlp_out)
        resid_mid = self.hook_resid_mid(resid_pre + attn_out)
        mlp_out = self.hook_mlp_out(self._mlp(self.ln2(self._mlp_in(resid_mid))))
        return self.hook_resid_post(resid_mid + mlp_out)

    def _attention(
        self,
        resid_pre: Float[Tensor, "batch pos d_model"],
        ctx: AttentionContext,
        cache_entry: AttentionEntry | None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """The attention's output; with per-head inputs, ``ln1`` normalizes each of them."""
        if not (self.use_attn_in or self.use_split_qkv_input):
            return self.attn(self.ln1(resid_pre), ctx, cache_entry)
        n_heads, n_kv_heads = self.attn.n_heads, self.attn.n_kv_heads
        if self.use_attn_in:
            attn_in = self.hook_attn_in(_per_head(resid_pre, n_heads))
        if self.use_split_qkv_input:
            # Under both options hook_attn_in fires but the split inputs are used (as in TL).
            query_input = self.hook_q_input(_per_head(resid_pre, n_heads))
            key_input = self.hook_k_input(_per_head(resid_pre, n_kv_heads))
            value_input = self.hook_v_input(_per_head(resid_pre, n_kv_heads))
        else:
            query_input = key_input = value_input = attn_in
        return self.attn(
            self.ln1(query_input), ctx, cache_entry, self.ln1(key_input), self.ln1(value_input)
        )

    def _mlp_in(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        # A copy, so that a hook editing it in place leaves the residual stream alone.
        return self.hook_mlp_in(x.clone()) if self.use_hook_mlp_in else x

    def _mlp(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        out = self.mlp(x)
        return self.ln2_post(out) if self.use_post_norms else out


def _per_head(
    x: Float[Tensor, "batch pos d_model"], n_heads: int
) -> Float[Tensor, "batch pos head d_model"]:
    """``x`` repeated for each of ``n_heads`` heads, a copy each (hooks may edit one head)."""
    return x.unsqueeze(2).expand(-1, -1, n_heads, -1).clone()
