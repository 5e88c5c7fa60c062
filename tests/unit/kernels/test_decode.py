"""The native decode-step kernels (RMSNorm, rotary, SiLU gate) against torch."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from kvlens import kernels

pytestmark = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler"
)


def too_many_rows() -> int:
    """One row more than the library takes (its own limit)."""
    limits = kernels.limits()
    assert limits is not None
    return limits.max_rows + 1


@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm_equals_torch(with_weight: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 100, generator=gen)[..., :96] * 5  # strided rows
    w = torch.randn(96, generator=gen) if with_weight else None
    got = kernels.rms_norm(x, w, 1e-5)
    assert got is not None and got.shape == x.shape
    torch.testing.assert_close(got, F.rms_norm(x, (96,), w, 1e-5), rtol=1e-5, atol=1e-6)


def test_rms_norm_declines_what_it_does_not_do() -> None:
    x = torch.randn(1, 8)
    assert kernels.rms_norm(x.double(), None, 1e-5) is None
    assert kernels.rms_norm(x, torch.randn(7), 1e-5) is None
    assert kernels.rms_norm(torch.randn(too_many_rows(), 8), None, 1e-5) is None
    assert kernels.rms_norm(x.requires_grad_(), None, 1e-5) is None


@pytest.mark.parametrize("adjacent", [False, True])
@pytest.mark.parametrize(
    ("batch", "n_new", "cos_batch"), [(1, 1, 1), (3, 1, 1), (2, 4, 2), (2, 3, 1)]
)
def test_rotary_inplace_equals_apply_rotary(
    adjacent: bool, batch: int, n_new: int, cos_batch: int
) -> None:
    from kvlens.components.positions import apply_rotary

    gen = torch.Generator().manual_seed(3)
    heads, d_head, half = 5, 16, 6  # rotary on 12 of 16 dimensions
    # q and k as the attention makes them: leading heads of a fused projection's output.
    fused = torch.randn(batch, n_new, heads + 2, d_head, generator=gen)
    x = fused[:, :, :heads]
    angles = torch.randn(cos_batch, n_new, 1, half, generator=gen)
    cos, sin = angles.cos(), angles.sin()
    expected = apply_rotary(x.clone(), cos, sin, adjacent)
    untouched = fused[:, :, heads:].clone()
    out = kernels.rotary_(x, cos, sin, adjacent)
    assert out is not None and out.data_ptr() == x.data_ptr()
    torch.testing.assert_close(x, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(fused[:, :, heads:], untouched)


def test_rotary_declines_what_it_does_not_do() -> None:
    x, cos = torch.randn(1, 1, 2, 8), torch.randn(1, 1, 1, 4)
    before = x.clone()
    assert kernels.rotary_(x, torch.randn(1, 1, 1, 5), torch.randn(1, 1, 1, 5)) is None
    assert kernels.rotary_(x.double(), cos.double(), cos.double()) is None
    assert kernels.rotary_(torch.randn(1, 2, 2, 8), cos, cos.clone()) is None  # pos mismatch
    assert torch.equal(x, before)


def test_silu_mul_equals_torch() -> None:
    gen = torch.Generator().manual_seed(4)
    gate_up = torch.randn(2, 1, 2 * 40, generator=gen) * 4
    gate, up = gate_up[..., :40], gate_up[..., 40:]  # strided views, as the MLP passes them
    expected = F.silu(gate) * up
    torch.testing.assert_close(kernels.silu_mul(gate, up), expected, rtol=1e-6, atol=1e-6)
    gate, up = gate.contiguous(), up.contiguous()
    torch.testing.assert_close(kernels.silu_mul(gate, up), expected, rtol=1e-6, atol=1e-6)
    assert kernels.silu_mul(torch.randn(1, 7), torch.randn(1, 6)) is None
    many = torch.randn(too_many_rows(), 8)
    assert kernels.silu_mul(many, many) is None
    assert kernels.silu_mul(gate.double(), up.double()) is None
    transposed = torch.randn(40, 2).t()  # rows not addressable with a stride on the last axis
    assert kernels.silu_mul(transposed, transposed) is None


def test_layer_norm_equals_torch() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 100, generator=gen)[..., :96] * 5 + 2  # strided rows, nonzero mean
    w, b = torch.randn(96, generator=gen), torch.randn(96, generator=gen)
    got = kernels.layer_norm(x, w, b, 1e-5)
    assert got is not None and got.shape == x.shape
    torch.testing.assert_close(got, F.layer_norm(x, (96,), w, b, 1e-5), rtol=1e-5, atol=1e-5)
    assert kernels.layer_norm(x.double(), w, b, 1e-5) is None
    assert kernels.layer_norm(x, w, torch.randn(95), 1e-5) is None
    assert kernels.layer_norm(torch.randn(too_many_rows(), 96), w, b, 1e-5) is None


@pytest.mark.parametrize(
    ("name", "reference"),
    [
        ("gelu", F.gelu),
        ("gelu_new", lambda t: F.gelu(t, approximate="tanh")),
        ("gelu_pytorch_tanh", lambda t: F.gelu(t, approximate="tanh")),
        ("relu", F.relu),
        ("silu", F.silu),
    ],
)
def test_activation_equals_torch(name: str, reference) -> None:  # type: ignore[no-untyped-def]
    x = torch.randn(3, 1, 200, generator=torch.Generator().manual_seed(0))[..., :150] * 4
    got = kernels.activation(x, name)
    assert got is not None
    torch.testing.assert_close(got, reference(x), rtol=1e-5, atol=2e-6)


def test_activation_declines_what_it_does_not_do() -> None:
    x = torch.randn(1, 8)
    assert kernels.activation(x, "softplus") is None
    assert kernels.activation(x.double(), "gelu") is None
    assert kernels.activation(torch.randn(8, 2).t(), "gelu") is None  # last axis strided
