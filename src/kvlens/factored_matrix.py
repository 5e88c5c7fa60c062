"""A matrix kept as the product of two factors, ``A @ B``, as TransformerLens's ``FactoredMatrix``.

A head's QK and OV circuits are ``[d_model, d_model]`` matrices of rank at most ``d_head``; kept
as their factors they are cheap to store, multiply, and decompose (the SVD of ``A @ B`` comes from
the SVDs of the two thin factors). Operations and results follow TransformerLens 2.18's class,
except that a shape mismatch raises ``ValueError`` (TransformerLens asserts).
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Complex, Float
from torch import Tensor

Index = Any  # what a tensor accepts in ``t[...]``: an int, a slice, None, a tuple of them


class FactoredMatrix:
    """The matrix ``A @ B``, batched over any leading dimensions, without computing it.

    Leading dimensions of ``A`` and ``B`` broadcast against each other; both factors are stored
    broadcast to the common shape (as views).

    Attributes:
        A: ``[..., ldim, mdim]``.
        B: ``[..., mdim, rdim]``.
        ldim, mdim, rdim: Rows, inner width and columns.
        shape: ``(*leading, ldim, rdim)``, the shape of ``A @ B``.
        has_leading_dims: Whether either factor, as given, had leading dimensions.
    """

    def __init__(
        self, A: Float[Tensor, "... ldim mdim"], B: Float[Tensor, "... mdim rdim"]
    ) -> None:
        if A.size(-1) != B.size(-2):
            raise ValueError(
                f"the factors do not share an inner dimension: A {tuple(A.shape)}, "
                f"B {tuple(B.shape)}"
            )
        self.ldim, self.mdim, self.rdim = A.size(-2), A.size(-1), B.size(-1)
        self.has_leading_dims = A.ndim > 2 or B.ndim > 2
        leading = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
        self.shape = torch.Size((*leading, self.ldim, self.rdim))
        self.A = A.broadcast_to((*leading, self.ldim, self.mdim))
        self.B = B.broadcast_to((*leading, self.mdim, self.rdim))
        self._svd: tuple[Tensor, Tensor, Tensor] | None = None

    def __repr__(self) -> str:
        return f"FactoredMatrix: Shape({self.shape}), Hidden Dim({self.mdim})"

    # Products ---------------------------------------------------------------------------------

    def __matmul__(self, other: Tensor | FactoredMatrix) -> Any:
        """``self @ other``: a vector gives a tensor, a matrix or factored matrix a factored one.

        A matrix is absorbed into whichever side keeps the inner width smallest.
        """
        if isinstance(other, FactoredMatrix):
            return (self @ other.A) @ other.B
        if not isinstance(other, Tensor):
            return NotImplemented
        if other.ndim < 2:
            return (self.A @ (self.B @ other.unsqueeze(-1))).squeeze(-1)
        if other.size(-2) != self.rdim:
            raise ValueError(
                f"cannot multiply a factored matrix of shape {tuple(self.shape)} by a tensor of "
                f"shape {tuple(other.shape)}: expected {self.rdim} rows"
            )
        if self.rdim > self.mdim:
            return FactoredMatrix(self.A, self.B @ other)
        return FactoredMatrix(self.AB, other)

    def __rmatmul__(self, other: Tensor | FactoredMatrix) -> Any:
        """``other @ self``, as :meth:`__matmul__` from the left."""
        if isinstance(other, FactoredMatrix):
            return other.A @ (other.B @ self)
        if not isinstance(other, Tensor):
            return NotImplemented
        if other.size(-1) != self.ldim:
            raise ValueError(
                f"cannot multiply a tensor of shape {tuple(other.shape)} by a factored matrix "
                f"of shape {tuple(self.shape)}: expected {self.ldim} columns"
            )
        if other.ndim < 2:
            return ((other.unsqueeze(-2) @ self.A) @ self.B).squeeze(-2)
        if self.ldim > self.mdim:
            return FactoredMatrix(other @ self.A, self.B)
        return FactoredMatrix(other, self.AB)

    def __mul__(self, scalar: float | Tensor) -> FactoredMatrix:
        """Scale by a number or a one-element tensor (scaling ``A`` scales the product)."""
        if isinstance(scalar, Tensor) and scalar.numel() != 1:
            raise ValueError(
                f"* takes a scalar, got a tensor of shape {tuple(scalar.shape)}; use @ to multiply "
                "by a matrix"
            )
        return FactoredMatrix(self.A * scalar, self.B)

    def __rmul__(self, scalar: float | Tensor) -> FactoredMatrix:
        return self * scalar

    @property
    def AB(self) -> Float[Tensor, "*leading ldim rdim"]:
        """The full product (``ldim * rdim`` per matrix: can be large)."""
        return self.A @ self.B

    @property
    def BA(self) -> Float[Tensor, "*leading mdim mdim"]:
        """The reverse product ``B @ A``, for square matrices (``ldim == rdim``)."""
        if self.ldim != self.rdim:
            raise ValueError(f"BA needs a square matrix, this one is {tuple(self.shape)}")
        return self.B @ self.A

    @property
    def T(self) -> FactoredMatrix:
        """The transpose of the last two dimensions, ``B^T @ A^T``."""
        return FactoredMatrix(self.B.transpose(-2, -1), self.A.transpose(-2, -1))

    @property
    def pair(
        self,
    ) -> tuple[Float[Tensor, "*leading ldim mdim"], Float[Tensor, "*leading mdim rdim"]]:
        """``(A, B)``."""
        return self.A, self.B

    # Decompositions ---------------------------------------------------------------------------

    def svd(
        self,
    ) -> tuple[
        Float[Tensor, "*leading ldim mdim"],
        Float[Tensor, "*leading mdim"],
        Float[Tensor, "*leading rdim mdim"],
    ]:
        """``(U, S, Vh)`` with ``U @ S.diag_embed() @ Vh.mT == A @ B`` (computed once).

        As in TransformerLens, ``Vh`` holds the right singular vectors as columns (it is ``V``,
        not ``V^T``). Only the factors' SVDs and one ``mdim``-sized one are computed.
        """
        if self._svd is None:
            u_a, s_a, vh_a = torch.linalg.svd(self.A, full_matrices=False)
            u_b, s_b, vh_b = torch.linalg.svd(self.B, full_matrices=False)
            middle = ((s_a[..., :, None] * vh_a) @ u_b) * s_b[..., None, :]
            u_m, s_m, vh_m = torch.linalg.svd(middle, full_matrices=False)
            self._svd = (u_a @ u_m, s_m, (vh_m @ vh_b).transpose(-2, -1))
        return self._svd

    @property
    def U(self) -> Float[Tensor, "*leading ldim mdim"]:
        return self.svd()[0]

    @property
    def S(self) -> Float[Tensor, "*leading mdim"]:
        return self.svd()[1]

    @property
    def Vh(self) -> Float[Tensor, "*leading rdim mdim"]:
        return self.svd()[2]

    @property
    def eigenvalues(self) -> Complex[Tensor, "*leading mdim"]:
        """The eigenvalues of ``B @ A``: those of ``A @ B`` but for zeros (``ldim == rdim``).

        16-bit matrices are decomposed in float32 (``torch.linalg.eig`` has no 16-bit kernel).
        """
        square = self.BA
        if square.dtype in (torch.float16, torch.bfloat16):
            square = square.float()
        return torch.linalg.eig(square).eigenvalues

    def norm(self) -> Float[Tensor, "*leading"]:
        """The Frobenius norm, from the singular values."""
        return self.S.pow(2).sum(-1).sqrt()

    def make_even(self) -> FactoredMatrix:
        """The same matrix as ``(U sqrt(S), sqrt(S) V^T)``: each factor carries half the scale."""
        root = self.S.sqrt()
        return FactoredMatrix(self.U * root[..., None, :], root[..., :, None] * self.Vh.mT)

    def collapse_l(self) -> Float[Tensor, "*leading mdim rdim"]:
        """``S V^T``: the matrix with its left orthogonal factor ``U`` dropped."""
        return self.S[..., :, None] * self.Vh.mT

    def collapse_r(self) -> Float[Tensor, "*leading ldim mdim"]:
        """``U S``: the matrix with its right orthogonal factor dropped."""
        return self.U * self.S[..., None, :]

    # Shape ------------------------------------------------------------------------------------

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def unsqueeze(self, k: int) -> FactoredMatrix:
        """A new leading dimension of size 1 at ``k`` of both factors."""
        return FactoredMatrix(self.A.unsqueeze(k), self.B.unsqueeze(k))

    def get_corner(self, k: int = 3) -> Float[Tensor, "..."]:
        """The first ``k`` entries of every dimension of ``A @ B``, computing only those."""
        corner = self.A[..., :k, :] @ self.B[..., :, :k]
        return corner[tuple(slice(k) for _ in range(corner.ndim))]

    def __getitem__(self, idx: Index) -> FactoredMatrix:
        """Index the leading dimensions, and optionally the rows and then the columns.

        An integer row or column index keeps its dimension (size 1), so the result is always a
        factored matrix.
        """
        idx = idx if isinstance(idx, tuple) else (idx,)
        length = sum(i is not None for i in idx)
        n_leading = self.ndim - 2
        if length <= n_leading:
            return FactoredMatrix(self.A[idx], self.B[idx])
        if length == n_leading + 1:
            idx = _keep_dim(idx, -1)
            return FactoredMatrix(self.A[idx], self.B[idx[:-1]])
        if length == n_leading + 2:
            idx = _keep_dim(_keep_dim(idx, -1), -2)
            columns = (*idx[:-2], slice(None), idx[-1])
            return FactoredMatrix(self.A[idx[:-1]], self.B[columns])
        raise ValueError(f"{idx} is too long an index for a FactoredMatrix of shape {self.shape}")


def _keep_dim(idx: tuple[Index, ...], where: int) -> tuple[Index, ...]:
    """``idx`` with an integer at ``where`` made a one-long slice, so its dimension stays."""
    item = idx[where]
    if not isinstance(item, int):
        return idx
    out = list(idx)
    out[where] = slice(item, item + 1)
    return tuple(out)


def composition_scores(
    left: FactoredMatrix, right: FactoredMatrix, broadcast_dims: bool = True
) -> Float[Tensor, "..."]:
    """How much ``right`` reads what ``left`` writes: ``|L R| / (|L| |R|)`` (Frobenius norms).

    The composition score of A Mathematical Framework for Transformer Circuits, as
    TransformerLens's ``utils.composition_scores`` computes it.

    Args:
        left: The writing matrices, e.g. heads' OV circuits.
        right: The reading matrices (``left.rdim == right.ldim``).
        broadcast_dims: Score every left matrix against every right one: the result's shape is
            ``left``'s leading dimensions followed by ``right``'s. Otherwise they broadcast.
    """
    if broadcast_dims:
        n_left, n_right = left.ndim - 2, right.ndim - 2
        for i in range(n_left):
            right = right.unsqueeze(i)
        for i in range(n_right):
            left = left.unsqueeze(i + n_left)
    if left.rdim != right.ldim:
        raise ValueError(
            f"composition needs left.rdim == right.ldim; shapes {left.shape} and {right.shape}"
        )
    reader, writer = right.collapse_r(), left.collapse_l()
    both = (writer @ reader).norm(dim=[-2, -1])
    return both / reader.norm(dim=[-2, -1]) / writer.norm(dim=[-2, -1])
