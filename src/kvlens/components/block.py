"""One transformer block: attention and MLP around the residual stream."""

from __future__ import annotations

from jaxtyping import Float
from torch import Tensor, nn

from kvlens.cache.entry import KeyValueCacheEntry
from kvlens.cache.shared import SharedPrefixEntry
from kvlens.components.attention import Attention
from kvlens.components.attention_context import AttentionContext
from kvlens.components.mlp import make_mlp
from kvlens.components.norm import make_norm
from kvlens.config import ModelConfig
from kvlens.hooks import HookPoint


class TransformerBlock(nn.Module):
    """Pre-norm block: ``resid + attn(ln1(resid))`` then ``+ mlp(ln2(.))``.

    With ``cfg.parallel_attn_mlp`` (GPT-NeoX) both read ``resid_pre`` and add in parallel:
    ``resid_post = resid_pre + attn_out + mlp_out``. Such a block has no ``hook_resid_mid``
    (TransformerLens declares one that never fires).
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

    def forward(
        self,
        resid_pre: Float[Tensor, "batch pos d_model"],
        ctx: AttentionContext,
        cache_entry: KeyValueCacheEntry | SharedPrefixEntry | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """Run the block on the new tokens; ``cache_entry`` (if any) gets their keys and values."""
        resid_pre = self.hook_resid_pre(resid_pre)
        attn_out = self.hook_attn_out(self.attn(self.ln1(resid_pre), ctx, cache_entry))
        if self.parallel:
            mlp_out = self.hook_mlp_out(self.mlp(self.ln2(resid_pre)))
            return self.hook_resid_post(resid_pre + attn_out + mlp_out)
        resid_mid = self.hook_resid_mid(resid_pre + attn_out)
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(resid_mid)))
        return self.hook_resid_post(resid_mid + mlp_out)
