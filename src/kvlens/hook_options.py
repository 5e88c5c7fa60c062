"""TransformerLens's opt-in hook points, switched on and off on a loaded model (``set_use_*``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvlens.hook_point import HookPoint


class HookOptionsMixin:
    """``set_use_attn_result``, ``set_use_split_qkv_input``, ``set_use_attn_in``,
    ``set_use_hook_mlp_in`` and ``set_use_hook_tokens``, as TransformerLens's."""

    cfg: Any
    blocks: Any
    context_level: int

    if TYPE_CHECKING:  # HookedRootModule's, later in the model's bases

        def setup(self) -> None: ...

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Compute each head's result, ``blocks.{i}.attn.hook_result`` ``[batch, pos,
        head_index, d_model]``, and sum them (``cfg.use_attn_result``; memory hungry)."""
        self._set_hook_options(use_attn_result=use_attn_result)

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """Give each head its own query, key and value input: ``blocks.{i}.hook_q_input``,
        ``hook_k_input``, ``hook_v_input`` (``cfg.use_split_qkv_input``)."""
        self._set_hook_options(use_split_qkv_input=use_split_qkv_input)

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        """Give each head its own input, ``blocks.{i}.hook_attn_in`` (``cfg.use_attn_in``).

        Raises:
            ValueError: Under grouped-query attention (use :meth:`set_use_split_qkv_input`).
        """
        self._set_hook_options(use_attn_in=use_attn_in)

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        """Declare ``blocks.{i}.hook_mlp_in``, the MLP's input before ``ln2``
        (``cfg.use_hook_mlp_in``)."""
        self._set_hook_options(use_hook_mlp_in=use_hook_mlp_in)

    def set_use_hook_tokens(self, use_hook_tokens: bool) -> None:
        """Declare ``hook_tokens`` ``[batch, pos]``, the token ids about to be embedded
        (``cfg.use_hook_tokens``; TransformerLens sets it only when building a model)."""
        self._set_hook_options(use_hook_tokens=use_hook_tokens)

    def _set_hook_options(self, **options: bool) -> None:
        """Replace ``cfg`` and declare the hook points it now asks for, dropping the others
        (with their hooks). Caches stay valid: the options are not in ``cfg.fingerprint()``."""
        for name, value in options.items():
            if not isinstance(value, bool):
                raise TypeError(f"set_{name} takes a bool, got {type(value).__name__}")
        self.cfg = self.cfg.replace(**options)
        for block in self.blocks:
            block.set_hook_options(self.cfg)
        if self.cfg.use_hook_tokens and not hasattr(self, "hook_tokens"):
            self.hook_tokens = HookPoint()
        elif not self.cfg.use_hook_tokens and hasattr(self, "hook_tokens"):
            del self.hook_tokens
        level = self.context_level  # setup() resets it; a hooks() block may be open
        self.setup()
        self.context_level = level
