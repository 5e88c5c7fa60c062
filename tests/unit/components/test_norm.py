"""LayerNorm and RMSNorm: values, and where ``hook_normalized``/``hook_scale`` sit."""

from __future__ import annotations

import torch

from kvlens.components.norm import LayerNorm, RMSNorm, make_norm
from kvlens.config import ModelConfig

CFG = ModelConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, n_ctx=8, d_vocab=10, eps=1e-5)


def randomize(norm: torch.nn.Module) -> None:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(torch.randn_like(p))


def test_layer_norm_values_and_hook_positions() -> None:
    norm = LayerNorm(CFG)
    randomize(norm)
    x = torch.randn(2, 3, 16) * 3 + 1
    expected = torch.nn.functional.layer_norm(x, (16,), norm.w, norm.b, 1e-5)
    seen = {}

    def record(t, *, hook):
        seen[hook.name or "point"] = t
        return None

    norm.hook_normalized.add_hook(record)
    out = norm(x)
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.equal(seen["point"], out)  # after w and b, as in TransformerLens
    norm.hook_scale.add_hook(lambda t, *, hook: t * 2)  # step-by-step path, scale edited
    halved = norm(x)
    assert torch.allclose(halved - norm.b, (expected - norm.b) / 2, atol=1e-5)


def test_rms_norm_values_and_hook_positions() -> None:
    norm = RMSNorm(CFG.replace(normalization_type="RMS"))
    randomize(norm)
    x = torch.randn(2, 3, 16)
    rms = x.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()
    seen = []
    norm.hook_normalized.add_hook(lambda t, *, hook: seen.append(t))
    assert torch.allclose(norm(x), x / rms * norm.w, atol=1e-6)
    assert torch.allclose(seen[0], x / rms, atol=1e-6)  # before w, as in TransformerLens
    norm.hook_scale.add_hook(lambda t, *, hook: seen.append(t))
    assert torch.allclose(norm(x), x / rms * norm.w, atol=1e-6)
    assert torch.allclose(seen[-2], rms, atol=1e-6)  # hook_scale fires before hook_normalized


def test_rms_norm_in_bfloat16_rounds_before_scaling() -> None:
    cfg = CFG.replace(normalization_type="RMS", dtype=torch.bfloat16)
    norm = make_norm(cfg)
    x = torch.randn(4, 16).to(torch.bfloat16)
    x32 = x.float()
    normalized = (x32 / x32.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()).to(torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, normalized * norm.w)
