"""Plain and gated MLPs against hand-written references; gated weights are views of one matrix."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvlens.components.mlp import MLP, GatedMLP, make_mlp
from kvlens.config import ModelConfig

CFG = ModelConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, n_ctx=8, d_vocab=10, d_mlp=12)


def randomize(module: torch.nn.Module) -> None:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p))


def test_plain_mlp() -> None:
    mlp = make_mlp(CFG.replace(act_fn="gelu"))
    assert isinstance(mlp, MLP)
    randomize(mlp)
    x = torch.randn(2, 3, 8)
    expected = F.gelu(x @ mlp.W_in + mlp.b_in) @ mlp.W_out + mlp.b_out
    assert torch.allclose(mlp(x), expected, atol=1e-5)


def test_gated_mlp_and_its_views() -> None:
    mlp = make_mlp(CFG.replace(gated_mlp=True, act_fn="silu", mlp_bias=False))
    assert isinstance(mlp, GatedMLP) and mlp.b_gate_in is None and mlp.b_gate is None
    assert torch.equal(mlp.b_in, torch.zeros(mlp.d_mlp))  # TransformerLens's zero bias
    randomize(mlp)
    x = torch.randn(2, 3, 8)
    expected = (F.silu(x @ mlp.W_gate) * (x @ mlp.W_in)) @ mlp.W_out
    seen = {}

    def record(t: torch.Tensor, *, hook: object) -> None:
        seen["lin"] = t

    mlp.hook_pre_linear.add_hook(record)
    assert torch.allclose(mlp(x), expected, atol=1e-5)
    assert torch.allclose(seen["lin"], x @ mlp.W_in, atol=1e-5)
    assert mlp.W_gate.shape == mlp.W_in.shape == (8, 12)
    with torch.no_grad():
        mlp.W_in.zero_()  # a view: edits the fused matrix
    assert torch.equal(mlp.W_gate_in[:, 12:], torch.zeros(8, 12))
    assert torch.equal(mlp(x), torch.zeros(2, 3, 8))


def test_gated_mlp_biases() -> None:
    mlp = GatedMLP(CFG.replace(gated_mlp=True, act_fn="gelu_new"))
    randomize(mlp)
    x = torch.randn(5, 8)[None]
    gate = x @ mlp.W_gate + mlp.b_gate
    lin = x @ mlp.W_in + mlp.b_in
    expected = (F.gelu(gate, approximate="tanh") * lin) @ mlp.W_out + mlp.b_out
    assert torch.allclose(mlp(x), expected, atol=1e-5)
