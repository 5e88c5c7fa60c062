"""ActivationCache's analysis methods: the same stacks, labels and shapes as TL's on the same run.

Each test runs both models on the same tokens and calls one method with the same arguments on
both caches. TL's ``apply_ln_to_stack`` assumes folded norms; the weights here are not folded, so
the tests compare the arithmetic TL does anyway (center, divide by the recorded scale).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tests.compat.pairs import Pair, assert_same, random_tokens

from kvlens.activation_cache import ActivationCache


def _caches(pair: Pair, batch: int = 2, pos: int = 6, seed: int = 0) -> tuple[Any, Any]:
    """A fresh (kvlens, TL) pair of caches of one run (methods may add head results to them)."""
    tokens = random_tokens(seed, batch, pos)
    _, kv_cache = pair.kv.run_with_cache(tokens)
    _, tl_cache = pair.tl.run_with_cache(tokens)
    return kv_cache, tl_cache


def _same_result(kv: Any, tl: Any, what: str) -> None:
    """Equal tensors, or equal ``(tensor, labels)`` pairs."""
    if isinstance(tl, tuple):
        assert kv[1] == tl[1], f"{what}: labels"
        kv, tl = kv[0], tl[0]
    assert_same(kv, tl, what)


def _needs_resid_mid(pair: Pair, method: str, kwargs: dict[str, Any]) -> bool:
    """``accumulated_resid`` reads ``resid_mid`` for ``incl_mid`` and ``mlp_input``."""
    wants_mid = bool(kwargs.get("incl_mid") or kwargs.get("mlp_input"))
    return method == "accumulated_resid" and pair.kv.cfg.parallel_attn_mlp and wants_mid


def _compare(pair: Pair, method: str, *args: Any, **kwargs: Any) -> None:
    """``method`` on both caches gives the same result, or ``KeyError`` on both."""
    kv_cache, tl_cache = _caches(pair)
    if _needs_resid_mid(pair, method, kwargs):  # parallel blocks: no resid_mid in either library
        with pytest.raises(KeyError):
            getattr(tl_cache, method)(*args, **kwargs)
        with pytest.raises(KeyError, match="resid_mid"):
            getattr(kv_cache, method)(*args, **kwargs)
        return
    tl = getattr(tl_cache, method)(*args, **kwargs)
    kv = getattr(kv_cache, method)(*args, **kwargs)
    _same_result(kv, tl, f"{method}{args} {kwargs}")


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"layer": 1},
        {"layer": 0},
        {"layer": -1, "incl_mid": True},
        {"apply_ln": True},
        {"apply_ln": True, "layer": 1},
        {"apply_ln": True, "incl_mid": True, "pos_slice": 2},
        {"pos_slice": -1},
        {"pos_slice": [0, 3, 5]},
        {"pos_slice": (1, 4)},
        {"layer": 1, "mlp_input": True, "apply_ln": True},
        {"layer": 0, "mlp_input": True, "pos_slice": [1]},
    ],
)
def test_accumulated_resid(pair: Pair, kwargs: dict[str, Any]) -> None:
    _compare(pair, "accumulated_resid", return_labels=True, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"mode": "attn"},
        {"mode": "mlp", "layer": 1},
        {"apply_ln": True},
        {"apply_ln": True, "layer": 1, "pos_slice": -2},
        {"layer": 1, "mlp_input": True, "apply_ln": True},
        {"layer": 0, "mlp_input": True, "mode": "attn"},
        {"incl_embeds": False, "pos_slice": [0, 2]},
        {"layer": -1, "pos_slice": (2, None)},
    ],
)
def test_decompose_resid(pair: Pair, kwargs: dict[str, Any]) -> None:
    _compare(pair, "decompose_resid", return_labels=True, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"layer": 1},
        {"layer": 0},
        {"layer": 0, "incl_remainder": True},
        {"incl_remainder": True, "apply_ln": True},
        {"apply_ln": True, "layer": 1, "pos_slice": -1},
        {"pos_slice": [1, 4]},
    ],
)
def test_stack_head_results(pair: Pair, kwargs: dict[str, Any]) -> None:
    _compare(pair, "stack_head_results", return_labels=True, **kwargs)


def test_compute_head_results(pair: Pair) -> None:
    """The head results added to the cache are TL's, and sum (with b_O) to the attention out."""
    kv_cache, tl_cache = _caches(pair)
    kv_cache.compute_head_results()
    tl_cache.compute_head_results()
    for layer in range(pair.kv.cfg.n_layers):
        name = f"blocks.{layer}.attn.hook_result"
        assert_same(kv_cache[name], tl_cache[name], name)
        b_O = pair.kv.blocks[layer].attn.b_O
        summed = kv_cache[name].sum(dim=-2) + (0 if b_O is None else b_O)
        assert_same(summed, kv_cache["attn_out", layer], f"{name} summed")


@pytest.mark.parametrize(
    "args",
    [("resid_pre",), ("pattern", 1), ("scale", -1, "ln2"), ("z",), ("mlp_out", 1)],
)
def test_stack_activation(pair: Pair, args: tuple[Any, ...]) -> None:
    _compare(pair, "stack_activation", *args)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"layer": 0},
        {"layer": -1, "pos_slice": -1},
        {"layer": 1, "neuron_slice": (3, 9)},
        {"layer": 0, "neuron_slice": [1, 7, 2], "pos_slice": [0, 5]},
        {"layer": 1, "neuron_slice": 4},
    ],
)
def test_get_neuron_results(pair: Pair, kwargs: dict[str, Any]) -> None:
    _compare(pair, "get_neuron_results", **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"layer": -1},
        {"layer": 1},
        {"layer": 0, "incl_remainder": True},
        {"layer": 2, "neuron_slice": [0, 5], "incl_remainder": True, "apply_ln": True},
        {"layer": 1, "neuron_slice": (10, 14), "pos_slice": -1, "apply_ln": True},
    ],
)
def test_stack_neuron_results(pair: Pair, kwargs: dict[str, Any]) -> None:
    _compare(pair, "stack_neuron_results", return_labels=True, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"layer": 0},
        {"layer": 1, "mlp_input": True},
        {"layer": -1, "batch_slice": 1},
        {"layer": 1, "batch_slice": [1, 0]},
        {"recompute_ln": True},
    ],
)
def test_apply_ln_to_stack(pair: Pair, kwargs: dict[str, Any]) -> None:
    gen = torch.Generator().manual_seed(3)
    stack = torch.randn((3, 2, 6, pair.kv.cfg.d_model), generator=gen)
    _compare(pair, "apply_ln_to_stack", stack, **kwargs)


def test_apply_ln_to_stack_sliced_positions(pair: Pair) -> None:
    """A stack already cut to some positions is scaled by those positions' scales."""
    gen = torch.Generator().manual_seed(4)
    stack = torch.randn((3, 2, 2, pair.kv.cfg.d_model), generator=gen)
    _compare(pair, "apply_ln_to_stack", stack, 1, pos_slice=[4, 1])
    _compare(pair, "apply_ln_to_stack", stack[:, :, 0], pos_slice=3)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"expand_neurons": False},
        {"apply_ln": True},
        {"layer": 1, "mlp_input": True},
        {"layer": 1, "mlp_input": True, "expand_neurons": False, "apply_ln": True},
        {"layer": 0, "pos_slice": -1},
        {"layer": 1, "pos_slice": [0, 5], "apply_ln": True},
    ],
)
def test_get_full_resid_decomposition(pair: Pair, kwargs: dict[str, Any]) -> None:
    _compare(pair, "get_full_resid_decomposition", return_labels=True, **kwargs)


def test_full_decomposition_sums_to_the_residual(pair: Pair) -> None:
    kv_cache, _ = _caches(pair)
    for expand in (True, False):
        stack = kv_cache.get_full_resid_decomposition(expand_neurons=expand)
        assert_same(stack.sum(dim=0), kv_cache["resid_post", -1], f"expand_neurons={expand}")


def test_logit_attrs(pair: Pair) -> None:
    kv_cache, tl_cache = _caches(pair)
    kv_stack, labels = kv_cache.decompose_resid(return_labels=True)
    tl_stack = tl_cache.decompose_resid()
    right = random_tokens(7, 2, 6)
    wrong = random_tokens(8, 2, 6)
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
        ((right,), {}),
        ((right,), {"incorrect_tokens": wrong}),
        ((5,), {"incorrect_tokens": 9}),
        ((torch.tensor(11),), {}),
    ]
    for args, kwargs in calls:
        kv = kv_cache.logit_attrs(kv_stack, *args, **kwargs)
        tl = tl_cache.logit_attrs(tl_stack, *args, **kwargs)
        assert_same(kv, tl, f"logit_attrs {kwargs}")
        assert kv.shape[0] == len(labels)
    # The last position only, one token per batch row, then one batch row.
    last_kv = kv_cache.decompose_resid(pos_slice=-1)
    last_tl = tl_cache.decompose_resid(pos_slice=-1)
    kv = kv_cache.logit_attrs(last_kv, right[:, -1], wrong[:, -1], pos_slice=-1)
    tl = tl_cache.logit_attrs(last_tl, right[:, -1], wrong[:, -1], pos_slice=-1)
    assert_same(kv, tl, "last position")
    kv = kv_cache.logit_attrs(last_kv, 4, pos_slice=-1, batch_slice=1)
    tl = tl_cache.logit_attrs(last_tl, 4, pos_slice=-1, batch_slice=1)
    assert_same(kv, tl, "one batch row")


def test_logit_attrs_shape_mismatch(pair: Pair) -> None:
    kv_cache, _ = _caches(pair)
    stack = kv_cache.decompose_resid()
    with pytest.raises(ValueError, match="one shape"):
        kv_cache.logit_attrs(stack, random_tokens(0, 2, 6), incorrect_tokens=3)


@pytest.mark.parametrize("batch_slice", [1, [1, 0], (0, 1), None])
def test_apply_slice_to_batch_dim(pair: Pair, batch_slice: Any) -> None:
    kv_cache, tl_cache = _caches(pair)
    kv = kv_cache.apply_slice_to_batch_dim(batch_slice)
    tl = tl_cache.apply_slice_to_batch_dim(batch_slice)
    assert isinstance(kv, ActivationCache)
    assert kv.has_batch_dim == tl.has_batch_dim
    assert sorted(kv.keys()) == sorted(tl.keys())
    for name in tl:
        assert_same(kv[name], tl[name], name)
    got = kv.decompose_resid(apply_ln=True, pos_slice=-1)
    assert_same(got, tl.decompose_resid(apply_ln=True, pos_slice=-1), "resid after slicing")


@pytest.mark.parametrize(
    "method, kwargs",
    [
        ("accumulated_resid", {"apply_ln": True}),
        ("accumulated_resid", {"layer": 1, "apply_ln": True, "pos_slice": 2}),
        ("decompose_resid", {"apply_ln": True, "pos_slice": [0, 1]}),
        ("stack_head_results", {"apply_ln": True, "incl_remainder": True}),
        ("stack_neuron_results", {"layer": 1, "apply_ln": True, "pos_slice": -1}),
        ("get_full_resid_decomposition", {"apply_ln": True, "expand_neurons": False}),
    ],
)
def test_without_batch_axis(pair: Pair, method: str, kwargs: dict[str, Any]) -> None:
    """``remove_batch_dim`` (run_with_cache's or the method) leaves every method TL's."""
    tokens = random_tokens(5, 1, 6)
    _, kv_cache = pair.kv.run_with_cache(tokens, remove_batch_dim=True)
    _, tl_cache = pair.tl.run_with_cache(tokens)
    tl_cache.remove_batch_dim()
    assert not kv_cache.has_batch_dim and not tl_cache.has_batch_dim
    kv = getattr(kv_cache, method)(return_labels=True, **kwargs)
    tl = getattr(tl_cache, method)(return_labels=True, **kwargs)
    _same_result(kv, tl, f"{method} {kwargs}")


def test_remove_batch_dim_needs_batch_one(pair: Pair) -> None:
    kv_cache, tl_cache = _caches(pair)
    with pytest.raises(AssertionError):
        tl_cache.remove_batch_dim()
    with pytest.raises(ValueError, match="batch size 1"):
        kv_cache.remove_batch_dim()


@pytest.mark.filterwarnings("ignore:The 'move_model' parameter is deprecated")
def test_to_moves_in_place(pair: Pair) -> None:
    """``to`` moves the cache itself and returns it, as TL's does."""
    kv_cache, tl_cache = _caches(pair)
    assert kv_cache.to("cpu") is kv_cache
    assert tl_cache.to("cpu") is tl_cache
    assert kv_cache.cpu() is kv_cache
    assert all(act.device.type == "cpu" for act in kv_cache.values())


# Pinned differences: calls TL 2.18 fails on, which kvlens answers.


def test_layers_below_minus_one(pair: Pair) -> None:
    """kvlens counts ``layer=-2`` back from the end; TL takes only ``-1`` (and fails or empties)."""
    kv_cache, tl_cache = _caches(pair)
    with pytest.raises(RuntimeError):
        tl_cache.accumulated_resid(layer=-2)
    n_layers = pair.kv.cfg.n_layers
    for method in ("accumulated_resid", "decompose_resid", "stack_head_results"):
        kv = getattr(kv_cache, method)(layer=-2, return_labels=True)
        tl = getattr(tl_cache, method)(layer=n_layers - 1, return_labels=True)
        _same_result(kv, tl, method)


def test_int_neuron_slice_keeps_one_neuron_per_layer(pair: Pair) -> None:
    kv_cache, tl_cache = _caches(pair)
    with pytest.raises(TypeError):
        tl_cache.stack_neuron_results(-1, neuron_slice=5)
    stack, labels = kv_cache.stack_neuron_results(-1, neuron_slice=5, return_labels=True)
    assert labels == ["L0N5", "L1N5"]
    want = tl_cache.stack_neuron_results(-1, neuron_slice=[5])
    assert_same(stack, want, "neuron 5")


def test_logit_lens_of_one_position_without_batch_axis(pair: Pair) -> None:
    """TL's ``ln_final`` fails on the ``[d_model]`` components; kvlens normalizes each one."""
    tokens = random_tokens(6, 1, 5)
    _, kv_cache = pair.kv.run_with_cache(tokens, remove_batch_dim=True)
    _, tl_cache = pair.tl.run_with_cache(tokens)
    tl_cache.remove_batch_dim()
    with pytest.raises(IndexError):
        tl_cache.accumulated_resid(apply_ln=True, pos_slice=-1)
    got = kv_cache.accumulated_resid(apply_ln=True, pos_slice=-1)
    want = tl_cache.accumulated_resid(apply_ln=True, pos_slice=[4])[:, 0]
    assert_same(got, want, "logit lens at the last position")
