"""The native decode kernels (RMSNorm, one-query attention) against torch."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from kvlens import kernels

pytestmark = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler"
)


@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm_equals_torch(with_weight: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 100, generator=gen)[..., :96] * 5  # strided rows
    w = torch.randn(96, generator=gen) if with_weight else None
    assert kernels.handles_rms_norm(x, w)
    got = kernels.rms_norm(x, w, 1e-5)
    assert got.shape == x.shape
    torch.testing.assert_close(got, F.rms_norm(x, (96,), w, 1e-5), rtol=1e-5, atol=1e-6)


def test_rms_norm_declines_what_it_does_not_do() -> None:
    x = torch.randn(1, 8)
    assert not kernels.handles_rms_norm(x.double(), None)
    assert not kernels.handles_rms_norm(x, torch.randn(7))
    assert not kernels.handles_rms_norm(torch.randn(kernels.MAX_ROWS + 1, 8), None)
    assert not kernels.handles_rms_norm(x.requires_grad_(), None)


def reference(q, k, v, mask):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    pattern = torch.softmax(scores.double(), -1).nan_to_num(0.0).float()
    return pattern @ v


@pytest.mark.parametrize(
    ("batch", "n_heads", "n_kv", "kv_len"),
    [(1, 9, 3, 130), (4, 4, 4, 7), (2, 8, 1, 50), (3, 6, 2, 1)],
)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_decode_attention_equals_softmax_attention(
    batch: int, n_heads: int, n_kv: int, kv_len: int, masked: bool, threads: int
) -> None:
    gen = torch.Generator().manual_seed(batch * 100 + kv_len)
    d_head = 16
    # Queries as the model makes them ([batch, 1, head, d] transposed) and keys and values as
    # views of a larger cache storage [batch, kv_head, capacity, d].
    q = torch.randn(batch, 1, n_heads, d_head, generator=gen).transpose(1, 2)
    k = torch.randn(batch, n_kv, kv_len + 5, d_head, generator=gen)[:, :, :kv_len]
    v = torch.randn(batch, n_kv, kv_len + 5, d_head, generator=gen)[:, :, :kv_len]
    mask = None
    if masked:
        mask = torch.rand(batch, 1, 1, kv_len, generator=gen) > 0.4
        mask[0, ..., -1] = True
    assert kernels.handles_decode_attention(q, k, v, mask)
    got = kernels.decode_attention(q, k, v, mask, threads=threads)
    assert got.shape == (batch, n_heads, 1, d_head)
    torch.testing.assert_close(got, reference(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_decode_attention_gives_zeros_where_no_key_is_allowed() -> None:
    q, k = torch.randn(2, 2, 1, 8), torch.randn(2, 1, 5, 8)
    mask = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    mask[1] = False
    got = kernels.decode_attention(q, k, k.clone(), mask)
    assert torch.equal(got[1], torch.zeros(2, 1, 8))
    torch.testing.assert_close(got[0], reference(q, k, k, mask)[0])


def test_decode_attention_declines_what_it_does_not_do() -> None:
    q, k = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 5, 8)
    assert kernels.handles_decode_attention(q, k, k, None)
    assert not kernels.handles_decode_attention(torch.randn(1, 4, 2, 8), k, k, None)  # 2 queries
    assert not kernels.handles_decode_attention(torch.randn(1, 3, 1, 8), k, k, None)  # 3 % 2
    assert not kernels.handles_decode_attention(q.double(), k.double(), k.double(), None)
    assert not kernels.handles_decode_attention(q, k, k, torch.ones(1, 1, 1, 5))  # float mask
    assert not kernels.handles_decode_attention(q, k, k, torch.ones(1, 1, 2, 5, dtype=torch.bool))
    assert not kernels.handles_decode_attention(q, k, k.transpose(2, 3).contiguous().mT, None)


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
    assert kernels.handles_rotary(x, cos, sin)
    out = kernels.rotary_inplace(x, cos, sin, adjacent)
    assert out.data_ptr() == x.data_ptr()
    torch.testing.assert_close(x, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(fused[:, :, heads:], untouched)


def test_rotary_declines_what_it_does_not_do() -> None:
    x, cos = torch.randn(1, 1, 2, 8), torch.randn(1, 1, 1, 4)
    assert kernels.handles_rotary(x, cos, cos.clone())
    assert not kernels.handles_rotary(x, torch.randn(1, 1, 1, 5), torch.randn(1, 1, 1, 5))
    assert not kernels.handles_rotary(x.double(), cos.double(), cos.double())
    assert not kernels.handles_rotary(torch.randn(1, 2, 2, 8), cos, cos.clone())  # pos mismatch


def test_silu_mul_equals_torch() -> None:
    gen = torch.Generator().manual_seed(4)
    gate_up = torch.randn(2, 1, 2 * 40, generator=gen) * 4
    assert kernels.handles_silu_mul(gate_up)
    expected = F.silu(gate_up[..., :40]) * gate_up[..., 40:]
    torch.testing.assert_close(kernels.silu_mul(gate_up), expected, rtol=1e-6, atol=1e-6)
    assert not kernels.handles_silu_mul(torch.randn(1, 7))
    assert not kernels.handles_silu_mul(torch.randn(kernels.MAX_ROWS + 1, 8))
