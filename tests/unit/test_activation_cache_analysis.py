"""ActivationCache's analysis methods and ``Slice``, on a tiny model (no TransformerLens)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from kvlens import ModelConfig
from kvlens.model import HookedTransformer
from kvlens.slice import Slice


def _model(**changes: object) -> HookedTransformer:
    fields: dict[str, object] = dict(
        n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32, n_ctx=16, d_vocab=40
    )
    fields.update(changes)
    torch.manual_seed(0)
    return HookedTransformer(ModelConfig(**fields)).eval()  # type: ignore[arg-type]


def _tokens() -> torch.Tensor:
    return torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "given, mode, kept",
    [
        (None, "identity", [0, 1, 2, 3, 4, 5]),
        (2, "int", [2]),
        ((1, 5, 2), "slice", [1, 3]),
        (slice(4, None), "slice", [4, 5]),
        ([5, 0], "array", [5, 0]),
        (torch.tensor([3]), "array", [3]),
        (np.array([1, 2]), "array", [1, 2]),
    ],
)
def test_slice_forms(given: object, mode: str, kept: list[int]) -> None:
    index = Slice(given)  # type: ignore[arg-type]
    assert index.mode == mode
    assert index.indices(6).tolist() == kept
    values = torch.arange(6) * 10
    got = index.apply(values[None, :, None], dim=1)
    if mode == "int":
        assert got.shape == (1, 1)  # an int drops the axis
    assert got.flatten().tolist() == [10 * k for k in kept]


def test_slice_unwrap_keeps_the_axis() -> None:
    assert Slice.unwrap(-2).apply(torch.arange(5)).tolist() == [3]
    assert Slice(-2).indices().tolist() == [-2]  # as TL: an int's index is itself
    same = Slice((0, 2))
    assert Slice.unwrap(same) is same
    assert Slice(same).mode == "slice"


def test_slice_errors() -> None:
    with pytest.raises(ValueError, match="a slice must be"):
        Slice("0:3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_ctx"):
        Slice([1]).indices()


def test_layer_out_of_range() -> None:
    _, cache = _model().run_with_cache(_tokens())
    with pytest.raises(ValueError, match="out of range"):
        cache.accumulated_resid(layer=3)
    with pytest.raises(ValueError, match="out of range"):
        cache.decompose_resid(layer=-4)


def test_decomposition_without_biases_or_final_norm() -> None:
    """Missing b_O / b_out count as zeros; with no ln_final, apply_ln leaves the final stack."""
    model = _model(attn_out_bias=False, mlp_bias=False, attn_qkv_bias=False, final_norm=False)
    _, cache = model.run_with_cache(_tokens())
    stack, labels = cache.get_full_resid_decomposition(return_labels=True)
    assert labels[-1] == "bias"
    assert torch.count_nonzero(stack[-1]) == 0
    torch.testing.assert_close(stack.sum(0), cache["resid_post", -1], atol=1e-5, rtol=1e-5)
    assert torch.equal(cache.apply_ln_to_stack(stack), stack)


def test_compute_head_results_twice(caplog: pytest.LogCaptureFixture) -> None:
    _, cache = _model().run_with_cache(_tokens())
    cache.compute_head_results()
    first = cache["result", 1]
    with caplog.at_level(logging.WARNING):
        cache.compute_head_results()
    assert "already" in caplog.text
    assert cache["result", 1] is first


def test_analysis_needs_the_model() -> None:
    from kvlens.activation_cache import ActivationCache

    cache = ActivationCache({"hook_embed": torch.zeros(1, 2, 4)})
    with pytest.raises(ValueError, match="model"):
        cache.decompose_resid()


def test_toggle_autodiff() -> None:
    _, cache = _model().run_with_cache(_tokens())
    try:
        cache.toggle_autodiff(False)
        assert not torch.is_grad_enabled()
        cache.toggle_autodiff(True)
        assert torch.is_grad_enabled()
    finally:
        torch.set_grad_enabled(True)


def test_batch_slice_of_a_cache_without_batch_axis() -> None:
    _, cache = _model().run_with_cache(_tokens()[:1], remove_batch_dim=True)
    assert cache.apply_slice_to_batch_dim(None)["resid_pre", 0].shape == (5, 16)
    with pytest.raises(ValueError, match="no batch axis"):
        cache.apply_slice_to_batch_dim(0)
