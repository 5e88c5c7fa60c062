"""The MLP: plain (GPT-2, GPT-NeoX) and gated (Llama, Mistral, Qwen2)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from kvlens import kernels
from kvlens.components.linear import linear
from kvlens.components.native import NativeMLP
from kvlens.components.quantizable import Quantizable
from kvlens.config import ActFn, ModelConfig
from kvlens.hooks import HookPoint


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "silu": F.silu,
    "relu": F.relu,
}


def activation(name: ActFn) -> Callable[[Tensor], Tensor]:
    """The activation function ``cfg.act_fn`` names (``gelu_new`` is the tanh approximation)."""
    return _ACTIVATIONS[name]


class MLP(Quantizable):
    """``act(x W_in + b_in) W_out + b_out``.

    Attributes:
        W_in: ``[d_model, d_mlp]``.
        W_out: ``[d_mlp, d_model]``.
        b_in: ``[d_mlp]`` and ``b_out``: ``[d_model]``, when ``cfg.mlp_bias`` (else ``None``).
    """

    block_matrices = ("W_in", "W_out")

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d_mlp = cfg.d_mlp_resolved
        self.act_fn = cfg.act_fn
        self.act = activation(cfg.act_fn)
        self.W_in = nn.Parameter(torch.empty(cfg.d_model, d_mlp, dtype=cfg.dtype))
        self.W_out = nn.Parameter(torch.empty(d_mlp, cfg.d_model, dtype=cfg.dtype))
        self.b_in = _bias(d_mlp, cfg)
        self.b_out = _bias(cfg.d_model, cfg)
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp]
        self.hook_post = HookPoint()  # [batch, pos, d_mlp]

    def native(self) -> NativeMLP | None:
        """This MLP for the fused native layer, or ``None`` (a replaced or unsupported
        activation, a subclass with its own forward)."""
        code = kernels.ACTIVATIONS.get(self.act_fn)
        if type(self).forward is not MLP.forward or code is None:
            return None
        if self.act is not _ACTIVATIONS[self.act_fn]:
            return None
        return NativeMLP(
            code, self.stored_weight("W_in"), self.b_in, self.stored_weight("W_out"), self.b_out
        )

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        pre = self.hook_pre(linear(x, self.stored_weight("W_in"), self.b_in))
        # A decode step's few rows: natively, unless the activation was replaced.
        post = (
            kernels.activation(pre, self.act_fn) if self.act is _ACTIVATIONS[self.act_fn] else None
        )
        post = self.hook_post(self.act(pre) if post is None else post)
        return linear(post, self.stored_weight("W_out"), self.b_out)


class GatedMLP(Quantizable):
    """``(act(x W_gate) * (x W_in)) W_out``, with both input projections in one matmul.

    The gate and input weights are stored side by side as ``W_gate_in: [d_model, 2 * d_mlp]``
    (gate first), so a decode step reads them with one matmul; ``W_gate`` and ``W_in`` are views
    of it with TransformerLens's shapes. Hooks as TransformerLens's gated MLP: ``hook_pre`` (the
    gate before the activation), ``hook_pre_linear`` (``x W_in``) and ``hook_post``.

    Attributes:
        W_gate_in: ``[d_model, 2 * d_mlp]``.
        W_out: ``[d_mlp, d_model]``.
        b_gate_in: ``[2 * d_mlp]`` and ``b_out``: ``[d_model]``, when ``cfg.mlp_bias`` (else
            ``None``; ``b_in``, a view of ``b_gate_in``, is then zeros, as in TransformerLens).
    """

    block_matrices = ("W_gate_in", "W_out")

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.d_mlp = cfg.d_mlp_resolved
        self.act = activation(cfg.act_fn)
        self.W_gate_in = nn.Parameter(torch.empty(cfg.d_model, 2 * self.d_mlp, dtype=cfg.dtype))
        self.W_out = nn.Parameter(torch.empty(self.d_mlp, cfg.d_model, dtype=cfg.dtype))
        self.b_gate_in = _bias(2 * self.d_mlp, cfg)
        self.b_out = _bias(cfg.d_model, cfg)
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp]
        self.hook_pre_linear = HookPoint()  # [batch, pos, d_mlp]
        self.hook_post = HookPoint()  # [batch, pos, d_mlp]

    @property
    def W_gate(self) -> Float[Tensor, "d_model d_mlp"]:
        return self.W_gate_in[:, : self.d_mlp]

    @property
    def W_in(self) -> Float[Tensor, "d_model d_mlp"]:
        return self.W_gate_in[:, self.d_mlp :]

    @property
    def b_gate(self) -> Float[Tensor, " d_mlp"] | None:
        return None if self.b_gate_in is None else self.b_gate_in[: self.d_mlp]

    @property
    def b_in(self) -> Float[Tensor, " d_mlp"]:
        """A view of the stored bias, or zeros (TransformerLens's ``b_in`` of a model without
        MLP biases; editing them does nothing) when the model has none."""
        if self.b_gate_in is None:
            return self.new_zeros("W_gate_in", self.d_mlp)
        return self.b_gate_in[self.d_mlp :]

    def native(self) -> NativeMLP | None:
        """This MLP for the fused native layer: a gated SiLU MLP only (else ``None``)."""
        if type(self).forward is not GatedMLP.forward or self.act is not F.silu:
            return None
        w_gate_in, w_out = self.stored_weight("W_gate_in"), self.stored_weight("W_out")
        return NativeMLP(None, w_gate_in, self.b_gate_in, w_out, self.b_out)

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        gate_in = linear(x, self.stored_weight("W_gate_in"), self.b_gate_in)
        pre = self.hook_pre(gate_in[..., : self.d_mlp])
        pre_linear = self.hook_pre_linear(gate_in[..., self.d_mlp :])
        # A decode step's few rows: one native call instead of two torch ops.
        post = kernels.silu_mul(pre, pre_linear) if self.act is F.silu else None
        if post is None:
            post = self.act(pre) * pre_linear
        return linear(self.hook_post(post), self.stored_weight("W_out"), self.b_out)


def _bias(size: int, cfg: ModelConfig) -> nn.Parameter | None:
    return nn.Parameter(torch.zeros(size, dtype=cfg.dtype)) if cfg.mlp_bias else None


def make_mlp(cfg: ModelConfig) -> MLP | GatedMLP:
    """The MLP ``cfg.gated_mlp`` chooses."""
    return GatedMLP(cfg) if cfg.gated_mlp else MLP(cfg)
