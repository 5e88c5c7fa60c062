"""FactoredMatrix against the dense product it stands for."""

from __future__ import annotations

import pytest
import torch

from kvlens import FactoredMatrix
from kvlens.factored_matrix import composition_scores


def factored(
    seed: int,
    a_shape: tuple[int, ...],
    b_shape: tuple[int, ...],
    dtype: torch.dtype = torch.float64,
) -> FactoredMatrix:
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(a_shape, generator=gen, dtype=dtype)
    return FactoredMatrix(A, torch.randn(b_shape, generator=gen, dtype=dtype))


def test_leading_dimensions_broadcast() -> None:
    m = factored(0, (2, 1, 5, 3), (4, 3, 6))
    assert m.shape == (2, 4, 5, 6) and isinstance(m.shape, torch.Size)
    assert m.A.shape == (2, 4, 5, 3) and m.B.shape == (2, 4, 3, 6)
    assert (m.ldim, m.mdim, m.rdim, m.ndim, m.has_leading_dims) == (5, 3, 6, 4, True)
    assert not factored(0, (5, 3), (3, 6)).has_leading_dims


def test_inner_dimensions_must_match() -> None:
    with pytest.raises(ValueError, match="inner dimension"):
        factored(0, (5, 3), (4, 6))
    m = factored(0, (5, 3), (3, 6))
    with pytest.raises(ValueError, match="expected 6 rows"):
        m @ torch.randn(5, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="expected 5 columns"):
        torch.randn(2, 6, dtype=torch.float64) @ m
    with pytest.raises(ValueError, match="square"):
        m.BA  # noqa: B018
    with pytest.raises(ValueError, match="scalar"):
        m * torch.ones(2)


def test_svd_reconstructs_the_product() -> None:
    m = factored(1, (3, 7, 4), (4, 5))
    U, S, Vh = m.svd()
    assert U.shape == (3, 7, 4) and S.shape == (3, 4) and Vh.shape == (3, 5, 4)
    torch.testing.assert_close(U @ torch.diag_embed(S) @ Vh.mT, m.AB)
    torch.testing.assert_close(S, torch.linalg.svdvals(m.AB)[..., :4])
    torch.testing.assert_close(m.norm(), m.AB.norm(dim=(-2, -1)))
    assert m.svd() is m.svd()  # computed once
    even = m.make_even()
    torch.testing.assert_close(even.AB, m.AB)
    torch.testing.assert_close(even.A.norm(dim=(-2, -1)), even.B.norm(dim=(-2, -1)))
    torch.testing.assert_close(U @ m.collapse_l(), m.AB)
    torch.testing.assert_close(m.collapse_r() @ Vh.mT, m.AB)


def test_eigenvalues_are_the_products_nonzero_ones() -> None:
    m = factored(2, (6, 2), (2, 6))
    dense = torch.linalg.eigvals(m.AB)
    top = dense[dense.abs().argsort(descending=True)[:2]]
    got = m.eigenvalues
    assert got.shape == (2,) and got.is_complex()
    key = lambda t: sorted(t.tolist(), key=lambda z: (round(z.real, 6), round(z.imag, 6)))  # noqa: E731
    assert key(got) == pytest.approx(key(top))
    assert factored(2, (6, 2), (2, 6), torch.bfloat16).eigenvalues.dtype == torch.complex64


@pytest.mark.parametrize("cols", [2, 8])
def test_products(cols: int) -> None:
    m = factored(3, (2, 6, 3), (3, 5))
    gen = torch.Generator().manual_seed(4)
    right = torch.randn(5, cols, generator=gen, dtype=torch.float64)
    left = torch.randn(cols, 6, generator=gen, dtype=torch.float64)
    torch.testing.assert_close((m @ right).AB, m.AB @ right)
    torch.testing.assert_close((left @ m).AB, left @ m.AB)
    # The other matrix goes into the factor that keeps the inner width (3 < 5 and 3 < 6) ...
    assert (m @ right).mdim == (left @ m).mdim == 3
    # ... or, when the outer width is the smaller one, the product becomes a factor.
    thin = factored(10, (2, 4), (4, 2))
    small = torch.randn(2, cols, generator=gen, dtype=torch.float64)
    assert (thin @ small).mdim == 2 and (small.mT @ thin).mdim == 2
    torch.testing.assert_close((thin @ small).AB, thin.AB @ small)
    torch.testing.assert_close((small.mT @ thin).AB, small.mT @ thin.AB)
    vec = torch.randn(5, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(m @ vec, m.AB @ vec)
    vec = torch.randn(6, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(vec @ m, vec @ m.AB)
    other = factored(5, (5, 2), (2, 4))
    torch.testing.assert_close((m @ other).AB, m.AB @ other.AB)
    torch.testing.assert_close((other.T @ m.T).AB, other.AB.mT @ m.AB.mT)
    torch.testing.assert_close((3 * m).AB, 3 * m.AB)
    torch.testing.assert_close(m.T.AB, m.AB.mT)
    torch.testing.assert_close(m.unsqueeze(1).AB, m.AB.unsqueeze(1))


@pytest.mark.parametrize(
    "idx", [1, (slice(0, 1),), (1, 4), (0, slice(2, 5)), (1, 2, 3), (slice(None), 0, slice(1, 3))]
)
def test_indexing_keeps_a_factored_matrix(idx: object) -> None:
    m = factored(6, (2, 6, 3), (3, 5))
    got = m[idx]
    full = idx if isinstance(idx, tuple) else (idx,)
    # Integer row and column indices keep their dimension.
    keep = tuple(slice(i, i + 1) if k > 0 and isinstance(i, int) else i for k, i in enumerate(full))
    torch.testing.assert_close(got.AB, m.AB[keep])
    with pytest.raises(ValueError, match="too long"):
        m[0, 0, 0, 0]


def test_get_corner() -> None:
    m = factored(7, (4, 6, 3), (3, 5))
    torch.testing.assert_close(m.get_corner(2), m.AB[:2, :2, :2])
    assert m.pair == (m.A, m.B)
    assert repr(m) == "FactoredMatrix: Shape(torch.Size([4, 6, 5])), Hidden Dim(3)"


def test_composition_scores() -> None:
    left, right = factored(8, (2, 6, 3), (3, 6)), factored(9, (3, 6, 2), (2, 6))
    scores = composition_scores(left, right)
    assert scores.shape == (2, 3)
    dense = left.AB[1] @ right.AB[2]
    expected = dense.norm() / (left.AB[1].norm() * right.AB[2].norm())
    torch.testing.assert_close(scores[1, 2], expected)
    paired = composition_scores(left[:1], right[:1], broadcast_dims=False)
    assert paired.shape == (1,)
    torch.testing.assert_close(paired[0], scores[0, 0])
