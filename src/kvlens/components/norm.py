"""LayerNorm and RMSNorm, each with TransformerLens's ``hook_scale`` and ``hook_normalized``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from kvlens import kernels
from kvlens.components.native import NativeNorm
from kvlens.config import ModelConfig
from kvlens.hooks import HookPoint
from kvlens.structure import WatchedModule


class LayerNorm(WatchedModule):
    """LayerNorm with a learned scale ``w`` and bias ``b``.

    As in TransformerLens, ``hook_normalized`` sees the output after ``w`` and ``b``. The fused
    ``F.layer_norm`` runs unless ``hook_scale`` is hooked; then the same arithmetic runs step by
    step so the hook sees (and may edit) the scale ``[batch, pos, 1]``.

    Attributes:
        w: ``[d_model]``.
        b: ``[d_model]``.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.eps = cfg.eps
        self.w = nn.Parameter(torch.ones(cfg.d_model, dtype=cfg.dtype))
        self.b = nn.Parameter(torch.zeros(cfg.d_model, dtype=cfg.dtype))
        self.hook_scale = HookPoint()  # [batch, pos, 1]
        self.hook_normalized = HookPoint()  # [batch, pos, d_model]

    def native(self) -> NativeNorm | None:
        """This norm for the fused native layer (``None`` for a subclass with its own forward)."""
        if type(self).forward is not LayerNorm.forward:
            return None
        return NativeNorm(True, self.eps, self.w, self.b)

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        if not self.hook_scale.has_hooks:
            # A decode step's few rows natively (the arithmetic the native decode layer uses).
            out = kernels.layer_norm(x, self.w, self.b, self.eps)
            if out is None:
                out = F.layer_norm(x, self.w.shape, self.w, self.b, self.eps)
            return self.hook_normalized(out)
        centered = x - x.mean(-1, keepdim=True)
        scale = self.hook_scale((centered.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        return self.hook_normalized(centered / scale * self.w + self.b)


class RMSNorm(WatchedModule):
    """RMSNorm with a learned scale ``w`` (Llama).

    As in TransformerLens, ``hook_normalized`` sees ``x / rms(x)`` before ``w`` is applied. The
    normalization runs in float32 and is rounded to the input dtype before ``w`` multiplies it,
    the order HF's Llama uses, so that low-precision runs match it.

    Attributes:
        w: ``[d_model]``.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.eps = cfg.eps
        self.w = nn.Parameter(torch.ones(cfg.d_model, dtype=cfg.dtype))
        self.hook_scale = HookPoint()  # [batch, pos, 1]
        self.hook_normalized = HookPoint()  # [batch, pos, d_model]

    def native(self) -> NativeNorm | None:
        """This norm for the fused native layer (``None`` for a subclass with its own forward)."""
        if type(self).forward is not RMSNorm.forward:
            return None
        return NativeNorm(False, self.eps, self.w, None)

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        if not self.hook_scale.has_hooks:
            # A decode step's few rows: natively, with w folded in unless hook_normalized must
            # see the result before w (the same float operations either way).
            if not self.hook_normalized.has_hooks:
                native = kernels.rms_norm(x, self.w, self.eps)
                if native is not None:
                    return native
            else:
                native = kernels.rms_norm(x, None, self.eps)
                if native is not None:
                    return self.hook_normalized(native) * self.w
        x32 = x.float()
        if self.hook_scale.has_hooks:
            scale = self.hook_scale((x32.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
            normalized = x32 / scale
        else:
            normalized = F.rms_norm(x32, self.w.shape, eps=self.eps)
        return self.hook_normalized(normalized.to(x.dtype)) * self.w


def make_norm(cfg: ModelConfig) -> LayerNorm | RMSNorm:
    """The normalization ``cfg.normalization_type`` names."""
    return LayerNorm(cfg) if cfg.normalization_type == "LN" else RMSNorm(cfg)
