"""Multi-head, grouped-query and multi-query causal self-attention."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn

from kvlens import kernels
from kvlens.cache.entry import AttentionEntry, KeySet
from kvlens.components.attend import attend
from kvlens.components.attention_context import AttentionContext
from kvlens.components.attention_rules import AttentionSpec
from kvlens.components.linear import linear
from kvlens.components.native import NativeAttention
from kvlens.components.positions import apply_rotary
from kvlens.components.quantizable import Quantizable
from kvlens.config import ModelConfig
from kvlens.factored_matrix import FactoredMatrix
from kvlens.hooks import HookPoint


class Attention(Quantizable):
    """Causal self-attention over the cached and the new tokens.

    Weights are stored fused for speed: one ``W_QKV: [d_model, (n_heads + 2 * n_kv) * d_head]``
    (query heads, then key heads, then value heads) and ``W_O_flat: [n_heads * d_head,
    d_model]``. TransformerLens's per-head names are properties with its shapes, views of them
    where they can be, so editing ``attn.W_Q[h]`` in place edits the model. Under grouped-query
    attention ``W_K``, ``W_V``, ``b_K``, ``b_V`` are repeated to one per query head, copies (as
    in TransformerLens), and the stored per-kv-head views are ``_W_K``, ``_W_V``, ``_b_K``,
    ``_b_V``. Without a q, k, v bias, ``b_Q``, ``b_K``, ``b_V`` are zeros; ``b_O`` is the
    stored parameter or ``None``.

    Order of operations: one matmul gives q, k, v ``[batch, pos, head, d_head]``; ``hook_q``,
    ``hook_k``, ``hook_v`` fire; rotary models rotate the new tokens' q and k (``hook_rot_q``,
    ``hook_rot_k``); the keys and values are appended to the cache entry as the hooks left them;
    attention reads all keys and values from the entry's storage without copying.

    Unlike TransformerLens, the cache holds keys *after* rotary (as HF's does), so a decode step
    rotates one key instead of every cached key again; ``hook_rot_k`` therefore covers the new
    tokens only, ``[batch, pos, kv_head, d_head]``, where TransformerLens's covers all keys.

    Attention itself (scale, soft-capping, masks and sliding window, and which implementation
    runs) is :func:`kvlens.components.attend.attend`, by the rules in ``self.spec``
    (:class:`~kvlens.components.attention_rules.AttentionSpec`). ``hook_z`` fires on every path.

    TransformerLens's hook options: given per-head inputs (``key_input``, ``value_input``: the
    block's ``use_split_qkv_input`` or ``use_attn_in``), each head's q, k, v come from its own
    input by a per-head matmul; with ``use_attn_result`` (:meth:`set_use_attn_result`) each
    head's output ``z W_O[h]`` passes ``hook_result`` ``[batch, pos, head_index, d_model]`` and
    the heads are summed (plus ``b_O``), as in TransformerLens. Both equal the fused matmuls up to
    float rounding.

    In a quantized model ``W_QKV`` and ``W_O_flat`` are held as blocks
    (:mod:`kvlens.components.quantizable`): the projections run on them, and every weight name
    above reads as their fp32 dequantization, read-only.
    """

    hook_result: HookPoint  # declared by set_use_attn_result only while it is on
    block_matrices = ("W_QKV", "W_O_flat")

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.d_head = cfg.d_head
        self.d_model = cfg.d_model
        self.rotary = cfg.positional_embedding_type == "rotary"
        self.rotary_adjacent_pairs = cfg.rotary_adjacent_pairs
        self.spec = AttentionSpec.from_config(cfg, layer_idx)
        width = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.d_head
        self.W_QKV = nn.Parameter(torch.empty(cfg.d_model, width, dtype=cfg.dtype))
        self.b_QKV = (
            nn.Parameter(torch.zeros(width, dtype=cfg.dtype)) if cfg.attn_qkv_bias else None
        )
        self.W_O_flat = nn.Parameter(
            torch.empty(cfg.n_heads * cfg.d_head, cfg.d_model, dtype=cfg.dtype)
        )
        self.b_O = (
            nn.Parameter(torch.zeros(cfg.d_model, dtype=cfg.dtype)) if cfg.attn_out_bias else None
        )
        self.hook_q = HookPoint()  # [batch, pos, head_index, d_head]
        self.hook_k = HookPoint()  # [batch, pos, kv_head, d_head]
        self.hook_v = HookPoint()  # [batch, pos, kv_head, d_head]
        if self.rotary:
            self.hook_rot_q = HookPoint()  # [batch, pos, head_index, d_head]
            self.hook_rot_k = HookPoint()  # [batch, pos, kv_head, d_head]
        self.hook_attn_scores = HookPoint()  # [batch, head_index, pos, kv_pos]
        self.hook_pattern = HookPoint()  # [batch, head_index, pos, kv_pos]
        self.hook_z = HookPoint()  # [batch, pos, head_index, d_head]
        self.use_attn_result = False
        self.set_use_attn_result(cfg.use_attn_result)

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Declare ``hook_result`` ``[batch, pos, head_index, d_model]`` and sum the heads'
        results, or drop it (with its hooks) and project ``z`` in one matmul."""
        self.use_attn_result = use_attn_result
        if use_attn_result and not hasattr(self, "hook_result"):
            self.hook_result = HookPoint()  # [batch, pos, head_index, d_model]
        elif not use_attn_result and hasattr(self, "hook_result"):
            del self.hook_result

    # TransformerLens's per-head weights ------------------------------------------------------

    def _qkv_slice(self, part: int) -> tuple[int, int, int]:
        q_width, kv_width = self.n_heads * self.d_head, self.n_kv_heads * self.d_head
        starts = (0, q_width, q_width + kv_width)
        heads = self.n_heads if part == 0 else self.n_kv_heads
        return starts[part], starts[part] + heads * self.d_head, heads

    def _weight(self, part: int) -> Float[Tensor, "head d_model d_head"]:
        start, end, heads = self._qkv_slice(part)
        return self.W_QKV[:, start:end].view(self.d_model, heads, self.d_head).transpose(0, 1)

    def _bias(self, part: int) -> Float[Tensor, "head d_head"]:
        start, end, heads = self._qkv_slice(part)
        if self.b_QKV is None:
            return self.new_zeros("W_QKV", heads, self.d_head)
        return self.b_QKV[start:end].view(heads, self.d_head)

    def _per_query_head(self, kv: Tensor) -> Tensor:
        """``kv`` (one row per kv head) as one row per query head: itself without grouping."""
        if self.n_kv_heads == self.n_heads:
            return kv
        return kv.repeat_interleave(self.n_heads // self.n_kv_heads, dim=0)

    @property
    def W_Q(self) -> Float[Tensor, "head_index d_model d_head"]:
        """A view of the stored weight: editing it in place edits the model."""
        return self._weight(0)

    @property
    def _W_K(self) -> Float[Tensor, "kv_head d_model d_head"]:
        """The stored key weight, one per kv head, as a view (TL's grouped-query ``_W_K``)."""
        return self._weight(1)

    @property
    def _W_V(self) -> Float[Tensor, "kv_head d_model d_head"]:
        """The stored value weight, one per kv head, as a view (TL's grouped-query ``_W_V``)."""
        return self._weight(2)

    @property
    def W_K(self) -> Float[Tensor, "head_index d_model d_head"]:
        """The key weight of each query head, as TransformerLens gives it.

        Under grouped-query attention each kv head's weight is repeated for the query heads that
        share it: a copy, so edit the model through :attr:`_W_K` instead. Otherwise it is a view
        of the stored weight, and editing it edits the model.
        """
        return self._per_query_head(self._W_K)

    @property
    def W_V(self) -> Float[Tensor, "head_index d_model d_head"]:
        """The value weight of each query head; a copy under grouped-query attention, like
        :attr:`W_K` (edit :attr:`_W_V` then)."""
        return self._per_query_head(self._W_V)

    @property
    def W_O(self) -> Float[Tensor, "head_index d_head d_model"]:
        """A view of the stored weight: editing it in place edits the model."""
        return self.W_O_flat.view(self.n_heads, self.d_head, self.d_model)

    @property
    def b_Q(self) -> Float[Tensor, "head_index d_head"]:
        """A view of the stored bias; zeros (new each time, editing them does nothing) when
        the model has no q, k, v bias, as TransformerLens's always-present biases are zero."""
        return self._bias(0)

    @property
    def _b_K(self) -> Float[Tensor, "kv_head d_head"]:
        """The stored key bias, one per kv head (zeros without a bias, as :attr:`b_Q`)."""
        return self._bias(1)

    @property
    def _b_V(self) -> Float[Tensor, "kv_head d_head"]:
        """The stored value bias, one per kv head (zeros without a bias, as :attr:`b_Q`)."""
        return self._bias(2)

    @property
    def b_K(self) -> Float[Tensor, "head_index d_head"]:
        """The key bias of each query head; a copy under grouped-query attention (see
        :attr:`W_K`), zeros without a bias (see :attr:`b_Q`)."""
        return self._per_query_head(self._b_K)

    @property
    def b_V(self) -> Float[Tensor, "head_index d_head"]:
        """The value bias of each query head, as :attr:`b_K`."""
        return self._per_query_head(self._b_V)

    @property
    def QK(self) -> FactoredMatrix:
        """Each head's QK circuit ``W_Q W_K^T``, ``[head_index, d_model, d_model]``, factored.

        Scores are ``x_dst QK x_src^T`` before scaling (and before rotary on rotary models).
        """
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        """Each head's OV circuit ``W_V W_O``, ``[head_index, d_model, d_model]``, factored."""
        return FactoredMatrix(self.W_V, self.W_O)

    def native(self) -> NativeAttention | None:
        """This attention for the fused native layer, or ``None``: the kernel has no
        soft-capping, and a subclass with its own forward computes something else."""
        if type(self).forward is not Attention.forward or self.spec.softcap is not None:
            return None
        spec = self.spec
        return NativeAttention(
            self.stored_weight("W_QKV"), self.b_QKV, self.stored_weight("W_O_flat"), self.b_O,
            spec.n_heads, spec.n_kv_heads,
            spec.d_head, spec.scale, spec.window, self.rotary, self.rotary_adjacent_pairs,
        )  # fmt: skip

    # Forward ----------------------------------------------------------------------------------

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"] | Float[Tensor, "batch pos head_index d_model"],
        ctx: AttentionContext,
        cache_entry: AttentionEntry | None = None,
        key_input: Float[Tensor, "batch pos kv_head d_model"] | None = None,
        value_input: Float[Tensor, "batch pos kv_head d_model"] | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """Attend from the new tokens ``x`` to the cached and the new tokens.

        Args:
            x: The normalized residual stream of the new tokens; with ``key_input`` and
                ``value_input``, each query head's own normalized input.
            ctx: Masks and rotary angles of this forward pass.
            cache_entry: This layer's cache entry; the new keys and values are appended to it,
                and it gives back every key and value to attend to (a shared prefix's too).
            key_input: Each kv head's own normalized input for its keys (TransformerLens's
                ``use_split_qkv_input`` and ``use_attn_in``); ``None``: ``x`` serves all three.
            value_input: The same for the values (given together with ``key_input``).
        """
        batch, n_new = x.shape[0], x.shape[1]
        if key_input is None or value_input is None:
            if key_input is not None or value_input is not None:
                raise ValueError("give key_input and value_input together, or neither")
            q, k, v = self._project_and_rotate(x, ctx)
        else:
            q, k, v = self._project_heads_and_rotate(x, key_input, value_input, ctx)
        if cache_entry is not None:
            keys = cache_entry.append_for_attention(k, v)
        else:
            keys = KeySet(k.transpose(1, 2), v.transpose(1, 2))
        z_heads = attend(
            q.transpose(1, 2), keys, self.spec, ctx, self.hook_attn_scores, self.hook_pattern
        )
        z = self.hook_z(z_heads.transpose(1, 2))
        if self.use_attn_result:
            return self._sum_of_results(z)
        return linear(z.reshape(batch, n_new, -1), self.stored_weight("W_O_flat"), self.b_O)

    def _sum_of_results(
        self, z: Float[Tensor, "batch pos head_index d_head"]
    ) -> Float[Tensor, "batch pos d_model"]:
        """Each head's result through ``hook_result``, summed over heads, plus ``b_O``."""
        result = self.hook_result(torch.einsum("bphd,hdm->bphm", z, self.W_O))
        out = result.sum(dim=2)
        return out if self.b_O is None else out + self.b_O

    def _project_and_rotate(
        self, x: Float[Tensor, "batch pos d_model"], ctx: AttentionContext
    ) -> tuple[
        Float[Tensor, "batch pos head_index d_head"],
        Float[Tensor, "batch pos kv_head d_head"],
        Float[Tensor, "batch pos kv_head d_head"],
    ]:
        """q, k, v from one matmul (views of its output) through their hooks, q and k rotated."""
        batch, n_new, _ = x.shape
        heads = linear(x, self.stored_weight("W_QKV"), self.b_QKV)
        heads = heads.view(batch, n_new, -1, self.d_head)
        n_q, n_qk = self.n_heads, self.n_heads + self.n_kv_heads
        # Unless q or k is hooked before rotary, rotate them in one call: they share the angles
        # and rotary is elementwise, so the result is bit-identical and a decode step does half
        # the small ops.
        joint = self.rotary and not (self.hook_q.has_hooks or self.hook_k.has_hooks)
        if not joint:
            return self._hook_and_rotate(
                heads[:, :, :n_q], heads[:, :, n_q:n_qk], heads[:, :, n_qk:], ctx
            )
        v = self.hook_v(heads[:, :, n_qk:])
        cos, sin = self._angles(ctx)
        # In place is safe: heads is this call's own matmul output, unseen by any hook.
        qk = kernels.rotary_(heads[:, :, :n_qk], cos, sin, self.rotary_adjacent_pairs)
        if qk is None:
            qk = apply_rotary(heads[:, :, :n_qk], cos, sin, self.rotary_adjacent_pairs)
        return self.hook_rot_q(qk[:, :, :n_q]), self.hook_rot_k(qk[:, :, n_q:]), v

    def _project_heads_and_rotate(
        self,
        query_input: Float[Tensor, "batch pos head_index d_model"],
        key_input: Float[Tensor, "batch pos kv_head d_model"],
        value_input: Float[Tensor, "batch pos kv_head d_model"],
        ctx: AttentionContext,
    ) -> tuple[
        Float[Tensor, "batch pos head_index d_head"],
        Float[Tensor, "batch pos kv_head d_head"],
        Float[Tensor, "batch pos kv_head d_head"],
    ]:
        """q, k, v from each head's own input (TransformerLens's per-head projection)."""
        for what, tensor, heads in (
            ("query_input", query_input, self.n_heads),
            ("key_input", key_input, self.n_kv_heads),
            ("value_input", value_input, self.n_kv_heads),
        ):
            if tensor.dim() != 4 or tensor.shape[2:] != (heads, self.d_model):
                raise ValueError(
                    f"{what} has shape {tuple(tensor.shape)}, expected "
                    f"[batch, pos, {heads}, {self.d_model}]"
                )
        q = torch.einsum("bphm,hmd->bphd", query_input, self.W_Q) + self._bias(0)
        k = torch.einsum("bphm,hmd->bphd", key_input, self._W_K) + self._bias(1)
        v = torch.einsum("bphm,hmd->bphd", value_input, self._W_V) + self._bias(2)
        return self._hook_and_rotate(q, k, v, ctx)

    def _hook_and_rotate(
        self,
        q: Float[Tensor, "batch pos head_index d_head"],
        k: Float[Tensor, "batch pos kv_head d_head"],
        v: Float[Tensor, "batch pos kv_head d_head"],
        ctx: AttentionContext,
    ) -> tuple[
        Float[Tensor, "batch pos head_index d_head"],
        Float[Tensor, "batch pos kv_head d_head"],
        Float[Tensor, "batch pos kv_head d_head"],
    ]:
        """q, k, v through their hooks, then q and k rotated (on copies) on rotary models."""
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        if not self.rotary:
            return q, k, v
        cos, sin = self._angles(ctx)
        q, k = self._rotate_copy(q, cos, sin), self._rotate_copy(k, cos, sin)
        return self.hook_rot_q(q), self.hook_rot_k(k), v

    def _angles(self, ctx: AttentionContext) -> tuple[Tensor, Tensor]:
        cos, sin = ctx.rotary_cos, ctx.rotary_sin
        if cos is None or sin is None:
            raise ValueError("this attention layer is rotary but ctx carries no rotary angles")
        return cos, sin

    def _rotate_copy(
        self, x: Float[Tensor, "batch pos head d_head"], cos: Tensor, sin: Tensor
    ) -> Float[Tensor, "batch pos head d_head"]:
        """Rotary on a copy of ``x`` (a hook may hold ``x``), with the joint path's arithmetic."""
        copy = x.clone(memory_format=torch.contiguous_format)
        rotated = kernels.rotary_(copy, cos, sin, self.rotary_adjacent_pairs)
        return apply_rotary(x, cos, sin, self.rotary_adjacent_pairs) if rotated is None else rotated
