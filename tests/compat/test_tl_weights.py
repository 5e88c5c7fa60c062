"""Weights, circuits and their analyses as TransformerLens shapes and computes them."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.compat.pairs import Pair, model_pair

WEIGHT_TOL = dict(atol=1e-5, rtol=1e-5)

STACKED = (
    "W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O",
    "W_in", "W_out", "b_in", "b_out", "W_gate", "W_U", "b_U", "W_E",
)  # fmt: skip


def same(kv: torch.Tensor, tl: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(kv, tl, **WEIGHT_TOL, msg=lambda m: f"{what}: {m}")


def test_stacked_weights(pair: Pair) -> None:
    for name in STACKED:
        kv, tl = getattr(pair.kv, name), getattr(pair.tl, name)
        if tl is None:  # W_gate of a plain MLP
            assert kv is None, name
            continue
        same(kv, tl, f"model.{name}")


def test_block_weights(pair: Pair) -> None:
    """Each block's weights; a stored bias the checkpoint lacks is ``None`` on the block.

    Pinned difference: kvlens's ``attn.b_O``, ``mlp.b_out`` (and a plain MLP's ``b_in``) are
    the stored parameters, ``None`` when absent (the forward pass and the fused decode layer
    skip them); TL's are zero parameters. The stacked ``model.b_O`` etc. are zeros in both.
    """
    names = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O")
    for i in range(pair.kv.cfg.n_layers):
        kv_attn, tl_attn = pair.kv.blocks[i].attn, pair.tl.blocks[i].attn
        kv_mlp, tl_mlp = pair.kv.blocks[i].mlp, pair.tl.blocks[i].mlp
        checks = [(kv_attn, tl_attn, name) for name in names]
        checks += [(kv_mlp, tl_mlp, name) for name in ("W_in", "W_out", "b_in", "b_out")]
        for kv_module, tl_module, name in checks:
            kv, tl = getattr(kv_module, name), getattr(tl_module, name)
            if kv is None:
                assert name in ("b_O", "b_out", "b_in") and not tl.any(), name
                continue
            same(kv, tl, f"blocks.{i}.{name}")
    if pair.family == "llama":  # no biases: b_Q etc. are zeros, b_O stays absent
        assert pair.kv.blocks[0].attn.b_O is None
        assert torch.equal(pair.kv.blocks[0].attn.b_K, torch.zeros(4, 8))


def test_grouped_query_raw_weights() -> None:
    """Under grouped-query attention the stored per-kv-head weights are TL's ``_W_K`` etc."""
    pair = model_pair("llama")
    n_heads, n_kv = pair.kv.cfg.n_heads, pair.kv.cfg.n_key_value_heads
    assert n_kv is not None and n_kv < n_heads
    for kv_block, tl_block in zip(pair.kv.blocks, pair.tl.blocks, strict=True):
        for name in ("_W_K", "_W_V", "_b_K", "_b_V"):
            kv, tl = getattr(kv_block.attn, name), getattr(tl_block.attn, name)
            assert kv.shape[0] == n_kv
            same(kv, tl, name)
        assert kv_block.attn.W_K.shape[0] == n_heads


def test_grouped_query_edits_go_through_the_stored_views() -> None:
    """``_W_K`` is a view (editing it changes the logits); the repeated ``W_K`` is a copy."""
    model = copy.deepcopy(model_pair("llama").kv)
    tokens = torch.tensor([[5, 6, 7, 8]])
    before = model(tokens)
    with torch.no_grad():
        model.blocks[0].attn.W_K.mul_(3.0)
        model.blocks[1].attn.b_V.add_(1.0)
    torch.testing.assert_close(model(tokens), before, atol=0, rtol=0)
    with torch.no_grad():
        model.blocks[0].attn._W_K.mul_(3.0)
    assert not torch.allclose(model(tokens), before)


def test_positional_embeddings(pair: Pair) -> None:
    if pair.kv.cfg.positional_embedding_type == "standard":
        same(pair.kv.W_pos, pair.tl.W_pos, "W_pos")
        same(pair.kv.W_E_pos, pair.tl.W_E_pos, "W_E_pos")
    else:  # rotary: neither has learned positions
        for model in (pair.kv, pair.tl):
            with pytest.raises(AttributeError):
                model.W_E_pos  # noqa: B018


def test_circuits(pair: Pair) -> None:
    for name in ("QK", "OV"):
        kv, tl = getattr(pair.kv, name), getattr(pair.tl, name)
        assert kv.shape == tl.shape and kv.mdim == tl.mdim
        same(kv.AB, tl.AB, f"model.{name}.AB")
        kv_block, tl_block = (
            getattr(pair.kv.blocks[1].attn, name),
            getattr(pair.tl.blocks[1].attn, name),
        )
        same(kv_block.AB, tl_block.AB, f"blocks.1.attn.{name}.AB")
        same(kv[1, 2].AB, tl[1, 2].AB, f"model.{name}[1, 2]")


def test_circuit_decompositions(pair: Pair) -> None:
    kv, tl = pair.kv.OV[0], pair.tl.OV[0]
    same(kv.S, tl.S, "OV.S")
    same(kv.U, tl.U, "OV.U")
    same(kv.Vh, tl.Vh, "OV.Vh")
    same(kv.norm(), tl.norm(), "OV.norm")
    same(kv.eigenvalues, tl.eigenvalues, "OV.eigenvalues")
    same(kv.get_corner(2), tl.get_corner(2), "OV.get_corner")
    same(pair.kv.QK.T.collapse_l(), pair.tl.QK.T.collapse_l(), "QK.T.collapse_l")


def test_head_labels(pair: Pair) -> None:
    assert pair.kv.all_head_labels() == pair.tl.all_head_labels()


@pytest.mark.parametrize(
    ("layer", "mlp_input", "include_mlp_biases"),
    [(0, False, True), (0, True, True), (1, False, True), (1, True, False), (2, False, False)],
)
def test_accumulated_bias(
    pair: Pair, layer: int, mlp_input: bool, include_mlp_biases: bool
) -> None:
    kv = pair.kv.accumulated_bias(layer, mlp_input, include_mlp_biases)
    tl = pair.tl.accumulated_bias(layer, mlp_input, include_mlp_biases)
    same(kv, tl, "accumulated_bias")
    if pair.kv.cfg.attn_out_bias and layer > 0:
        assert kv.abs().sum() > 0  # the test compares something


def test_accumulated_bias_refuses_an_mlp_input_past_the_last_layer() -> None:
    model = model_pair("gpt2").kv
    with pytest.raises(ValueError, match="n_layers"):
        model.accumulated_bias(model.cfg.n_layers, mlp_input=True)


@pytest.mark.parametrize("mode", ["Q", "K", "V"])
def test_all_composition_scores(pair: Pair, mode: str) -> None:
    kv = pair.kv.all_composition_scores(mode)  # type: ignore[arg-type]
    tl = pair.tl.all_composition_scores(mode)
    n_layers, n_heads = pair.kv.cfg.n_layers, pair.kv.cfg.n_heads
    assert kv.shape == (n_layers, n_heads, n_layers, n_heads)
    same(kv, tl, f"composition scores {mode}")
    assert kv[0, :, 1].abs().sum() > 0 and kv[1, :, 0].abs().sum() == 0


def test_composition_scores_refuse_an_unknown_mode() -> None:
    with pytest.raises(ValueError, match="mode"):
        model_pair("gpt2").kv.all_composition_scores("X")  # type: ignore[arg-type]


def _factored_pair(seed: int, a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> tuple:
    from transformer_lens import FactoredMatrix as TLFactoredMatrix

    from kvlens import FactoredMatrix

    gen = torch.Generator().manual_seed(seed)
    A, B = torch.randn(a_shape, generator=gen), torch.randn(b_shape, generator=gen)
    return FactoredMatrix(A, B), TLFactoredMatrix(A, B)


@pytest.mark.parametrize(
    ("a_shape", "b_shape"),
    [((6, 3), (3, 6)), ((2, 5, 5, 3), (3, 5)), ((4, 2), (3, 2, 4))],
    ids=["square", "leading-A", "leading-B"],
)
def test_factored_matrix_operations(a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> None:
    kv, tl = _factored_pair(0, a_shape, b_shape)
    assert kv.shape == tl.shape and kv.ndim == tl.ndim
    assert (kv.ldim, kv.mdim, kv.rdim, kv.has_leading_dims) == (
        tl.ldim, tl.mdim, tl.rdim, tl.has_leading_dims,
    )  # fmt: skip
    tensors = {
        "AB": (kv.AB, tl.AB), "BA": (kv.BA, tl.BA), "T.AB": (kv.T.AB, tl.T.AB),
        "S": (kv.S, tl.S), "U": (kv.U, tl.U), "Vh": (kv.Vh, tl.Vh),
        "norm": (kv.norm(), tl.norm()), "eigenvalues": (kv.eigenvalues, tl.eigenvalues),
        "corner": (kv.get_corner(2), tl.get_corner(2)),
        "collapse_l": (kv.collapse_l(), tl.collapse_l()),
        "collapse_r": (kv.collapse_r(), tl.collapse_r()),
        "make_even": (kv.make_even().AB, tl.make_even().AB),
        "make_even.A": (kv.make_even().A, tl.make_even().A),
        "unsqueeze": (kv.unsqueeze(0).AB, tl.unsqueeze(0).AB),
        "scaled": ((2.5 * kv).AB, (2.5 * tl).AB),
        "scaled by tensor": ((kv * torch.tensor(0.5)).AB, (tl * torch.tensor(0.5)).AB),
        "pair.B": (kv.pair[1], tl.pair[1]),
    }  # fmt: skip
    for what, (got, want) in tensors.items():
        same(got, want, what)
    assert repr(kv) == repr(tl)


@pytest.mark.parametrize("other_cols", [2, 9])
def test_factored_matrix_products(other_cols: int) -> None:
    """Products on both sides, with vectors, matrices and factored matrices; both absorbing
    choices (a thin and a wide other matrix)."""
    kv, tl = _factored_pair(1, (3, 5, 4), (4, 5))
    gen = torch.Generator().manual_seed(2)
    right, left = (
        torch.randn(5, other_cols, generator=gen),
        torch.randn(other_cols, 5, generator=gen),
    )
    vec = torch.randn(5, generator=gen)
    kv_other, tl_other = _factored_pair(3, (5, 2), (2, 6))
    products = {
        "@ matrix": (kv @ right, tl @ right),
        "matrix @": (left @ kv, left @ tl),
        "@ factored": (kv @ kv_other, tl @ tl_other),
        "factored @": (kv_other.T @ kv, tl_other.T @ tl),
    }
    for what, (got, want) in products.items():
        assert got.mdim == want.mdim, what
        same(got.AB, want.AB, what)
        same(got.A, want.A, f"{what} (A)")
    same(kv @ vec, tl @ vec, "@ vector")
    same(vec @ kv, vec @ tl, "vector @")
    # Outer widths below the inner one: the product becomes a factor.
    kv_thin, tl_thin = _factored_pair(6, (3, 4), (4, 3))
    small = torch.randn(3, other_cols, generator=gen)
    for got, want in ((kv_thin @ small, tl_thin @ small), (small.mT @ kv_thin, small.mT @ tl_thin)):
        assert got.mdim == want.mdim
        same(got.A, want.A, "thin product (A)")
        same(got.B, want.B, "thin product (B)")


@pytest.mark.parametrize(
    "idx",
    [0, (1,), (slice(1, 3),), (0, 2), (1, slice(0, 3)), (2, 1, 3), (slice(None), 2, slice(1, 4))],
)
def test_factored_matrix_indexing(idx: object) -> None:
    kv, tl = _factored_pair(4, (3, 5, 4), (4, 6))
    got, want = kv[idx], tl[idx]
    assert got.shape == want.shape
    same(got.AB, want.AB, f"[{idx}]")


def test_factored_matrix_index_too_long() -> None:
    kv, _ = _factored_pair(5, (5, 4), (4, 6))
    with pytest.raises(ValueError, match="too long"):
        kv[0, 0, 0]
