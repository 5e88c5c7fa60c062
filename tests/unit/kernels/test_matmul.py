"""The native small-batch matmul kernel against torch, and its build, cache and fallbacks."""

from __future__ import annotations

import shutil

import pytest
import torch

from kvlens import kernels
from kvlens.components.linear import linear

HAS_COMPILER = shutil.which("cc") is not None or shutil.which("gcc") is not None
needs_kernel = pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler on this machine")


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    out = x.double() @ w.double()
    return (out if b is None else out + b.double()).float()


@needs_kernel
@pytest.mark.parametrize(
    ("rows", "d_in", "d_out"),
    [
        (1, 576, 960),  # K split, rows whole
        (1, 1536, 576),
        (3, 576, 9000),  # column split at two threads, a ragged last block
        (5, 7, 33),  # odd sizes, a K tail shorter than 4
        (16, 64, 128),  # many rows, narrow blocks
        (2, 130, 4100),  # several blocks per row with a remainder
    ],
)
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("with_bias", [False, True])
def test_kernel_equals_float64_product(
    rows: int, d_in: int, d_out: int, threads: int, with_bias: bool
) -> None:
    gen = torch.Generator().manual_seed(rows * 1000 + d_out)
    x = torch.randn(rows, d_in, generator=gen)
    w = torch.randn(d_in, d_out, generator=gen)
    b = torch.randn(d_out, generator=gen) if with_bias else None
    got = kernels.matmul(x, w, b, threads=threads)
    assert got is not None
    assert got.shape == (rows, d_out) and got.dtype == torch.float32
    torch.testing.assert_close(got, reference(x, w, b), rtol=1e-5, atol=1e-4 * d_in**0.5)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
def test_a_row_in_a_batch_is_bitwise_the_row_alone(threads: int) -> None:
    gen = torch.Generator().manual_seed(1)
    for d_out in (960, 9000):
        x = torch.randn(7, 576, generator=gen)
        w = torch.randn(576, d_out, generator=gen)
        b = torch.randn(d_out, generator=gen)
        batch = kernels.matmul(x, w, b, threads=threads)
        assert batch is not None
        for i in range(7):
            alone = kernels.matmul(x[i : i + 1], w, b, threads=threads)
            assert alone is not None and torch.equal(alone[0], batch[i])


@needs_kernel
def test_strided_rows_and_leading_axes() -> None:
    gen = torch.Generator().manual_seed(2)
    wide = torch.randn(2, 3, 100, generator=gen)
    x = wide[..., :90]  # rows 100 floats apart
    w = torch.randn(90, 70, generator=gen)
    got = kernels.matmul(x, w)
    assert got is not None and got.shape == (2, 3, 70)
    torch.testing.assert_close(got, reference(x, w, None), rtol=1e-5, atol=1e-4)


def test_declines_what_the_kernel_does_not_do() -> None:
    x, w = torch.randn(1, 8), torch.randn(8, 4)
    assert (kernels.matmul(x, w) is not None) == kernels.available()
    assert kernels.matmul(x.double(), w.double()) is None
    limits = kernels.limits()
    if limits is not None:
        assert kernels.matmul(torch.randn(limits.max_rows, 8), w) is not None
        assert kernels.matmul(torch.randn(limits.max_rows + 1, 8), w) is None
    assert kernels.matmul(x, torch.randn(4, 8).t()) is None  # not contiguous
    assert kernels.matmul(x, torch.randn(7, 4)) is None  # d_in mismatch
    assert kernels.matmul(torch.randn(0, 8), w) is None
    assert kernels.matmul(x, w, torch.randn(5)) is None  # bias of the wrong width
    needs_grad = w.clone().requires_grad_()
    assert kernels.matmul(x, needs_grad) is None
    with torch.no_grad():
        assert (kernels.matmul(x, needs_grad) is not None) == kernels.available()


def test_linear_keeps_autograd_through_the_torch_path() -> None:
    x, w = torch.randn(1, 8), torch.randn(8, 4, requires_grad=True)
    linear(x, w, None).sum().backward()
    assert w.grad is not None
    torch.testing.assert_close(w.grad, x.t().expand(8, 4))


@needs_kernel
def test_linear_gives_the_same_with_and_without_the_kernel() -> None:
    x, w, b = torch.randn(2, 1, 64), torch.randn(64, 48), torch.randn(48)
    native = linear(x, w, b)
    torch.testing.assert_close(native, torch.addmm(b, x.view(2, 64), w).view(2, 1, 48))
