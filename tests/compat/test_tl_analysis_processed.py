"""The analysis methods and weight shortcuts on processed weights: the same as TL 2.18's.

Each family's pair is copied and processed once per module, each model by its own library with
TL's defaults (fold the norms, center the writing weights and the unembedding, fold the value
biases). Then the cache methods, which now normalize with the folded (identity-scale) norms,
and the weight shortcuts are compared on the same run, as the unprocessed tests in
``test_tl_activation_cache_analysis.py`` and ``test_tl_weights.py`` compare them.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
import torch
from tests.compat.pairs import FAMILIES, Pair, assert_same, model_pair, random_tokens

TOKENS = random_tokens(11, 2, 7)


@functools.cache
def _processed_pair(family: str) -> Pair:
    """Copies of ``family``'s pair (never the shared originals), each processed by its library."""
    pair = model_pair(family)
    kv, tl = copy.deepcopy(pair.kv), copy.deepcopy(pair.tl)
    kv.process_weights_()
    # TL 2.18's process_weights_ has no fold_value_biases flag: it always folds them.
    tl.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
    # TL's process_weights_ swaps in LNPre/RMSNormPre modules without registering their hooks
    # (from_pretrained builds them from the start, so they are registered there).
    tl.setup()
    return Pair(family, kv, tl)


@pytest.fixture(params=FAMILIES, scope="module")
def ppair(request: pytest.FixtureRequest) -> Pair:
    """The processed pair of each family."""
    return _processed_pair(request.param)


def _caches(pair: Pair) -> tuple[Any, Any]:
    """A fresh (kvlens, TL) pair of caches of one run (methods may add head results to them)."""
    _, kv_cache = pair.kv.run_with_cache(TOKENS)
    _, tl_cache = pair.tl.run_with_cache(TOKENS)
    return kv_cache, tl_cache


def _same_result(kv: Any, tl: Any, what: str) -> None:
    """Equal tensors, or equal ``(tensor, labels)`` pairs."""
    if isinstance(tl, tuple):
        assert kv[1] == tl[1], f"{what}: labels"
        kv, tl = kv[0], tl[0]
    assert_same(kv, tl, what)


def _compare(pair: Pair, method: str, *args: Any, **kwargs: Any) -> None:
    """``method`` on both caches gives the same result, or ``KeyError`` on both."""
    kv_cache, tl_cache = _caches(pair)
    wants_mid = kwargs.get("incl_mid") or kwargs.get("mlp_input")
    if method == "accumulated_resid" and pair.kv.cfg.parallel_attn_mlp and wants_mid:
        # Parallel blocks have no resid_mid in either library.
        with pytest.raises(KeyError):
            getattr(tl_cache, method)(*args, **kwargs)
        with pytest.raises(KeyError, match="resid_mid"):
            getattr(kv_cache, method)(*args, **kwargs)
        return
    tl = getattr(tl_cache, method)(*args, **kwargs)
    kv = getattr(kv_cache, method)(*args, **kwargs)
    _same_result(kv, tl, f"{method}{args} {kwargs}")


def test_processed_logits_and_cache(ppair: Pair) -> None:
    assert ppair.kv.weight_processing.fold_ln
    assert ppair.tl.cfg.normalization_type == f"{ppair.kv.cfg.normalization_type}Pre"
    kv_logits, kv_cache = ppair.kv.run_with_cache(TOKENS)
    tl_logits, tl_cache = ppair.tl.run_with_cache(TOKENS)
    assert_same(kv_logits, tl_logits, "logits")
    assert set(kv_cache.keys()) == set(tl_cache.keys())
    for name in ("ln_final.hook_scale", "blocks.1.ln1.hook_normalized", "blocks.0.hook_resid_post"):
        assert_same(kv_cache[name], tl_cache[name], name)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"layer": None, "apply_ln": True},
        {"layer": 1},
        {"layer": 1, "apply_ln": True},
        {"layer": 0, "apply_ln": True, "pos_slice": -1},
        {"layer": -1},
        {"layer": -1, "apply_ln": True, "pos_slice": -1},
        {"layer": -1, "incl_mid": True, "apply_ln": True},
        {"incl_mid": True, "pos_slice": -1},
        {"incl_mid": True, "apply_ln": True, "pos_slice": None},
        {"apply_ln": True, "pos_slice": -1},
        {"layer": 1, "mlp_input": True, "apply_ln": True},
    ],
)
@pytest.mark.parametrize("return_labels", [True, False])
def test_accumulated_resid(ppair: Pair, kwargs: dict[str, Any], return_labels: bool) -> None:
    _compare(ppair, "accumulated_resid", return_labels=return_labels, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"mode": "all", "apply_ln": True},
        {"mode": "mlp"},
        {"mode": "mlp", "apply_ln": True, "pos_slice": -1},
        {"mode": "attn"},
        {"mode": "attn", "apply_ln": True},
        {"layer": 1, "apply_ln": True, "pos_slice": -1},
        {"layer": 1, "mlp_input": True, "apply_ln": True},
    ],
)
def test_decompose_resid(ppair: Pair, kwargs: dict[str, Any]) -> None:
    _compare(ppair, "decompose_resid", return_labels=True, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"apply_ln": True},
        {"apply_ln": True, "pos_slice": -1},
        {"pos_slice": -1},
        {"layer": 1, "incl_remainder": True, "apply_ln": True},
        {"apply_ln": True, "pos_slice": [0, 4]},
    ],
)
def test_stack_head_results(ppair: Pair, kwargs: dict[str, Any]) -> None:
    _compare(ppair, "stack_head_results", return_labels=True, **kwargs)


def test_compute_head_results(ppair: Pair) -> None:
    """The head results sum (with the folded ``b_O``) to the attention output."""
    kv_cache, tl_cache = _caches(ppair)
    kv_cache.compute_head_results()
    tl_cache.compute_head_results()
    for layer in range(ppair.kv.cfg.n_layers):
        name = f"blocks.{layer}.attn.hook_result"
        assert_same(kv_cache[name], tl_cache[name], name)
        b_O = ppair.kv.blocks[layer].attn.b_O
        summed = kv_cache[name].sum(dim=-2) + (0 if b_O is None else b_O)
        assert_same(summed, kv_cache["attn_out", layer], f"{name} summed")


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"expand_neurons": False},
        {"apply_ln": True},
        {"expand_neurons": False, "apply_ln": True},
        {"apply_ln": True, "pos_slice": -1},
        {"layer": 1, "mlp_input": True, "apply_ln": True},
    ],
)
def test_get_full_resid_decomposition(ppair: Pair, kwargs: dict[str, Any]) -> None:
    _compare(ppair, "get_full_resid_decomposition", return_labels=True, **kwargs)


def test_full_decomposition_sums_to_the_residual(ppair: Pair) -> None:
    kv_cache, _ = _caches(ppair)
    for expand in (True, False):
        stack = kv_cache.get_full_resid_decomposition(expand_neurons=expand)
        assert_same(stack.sum(dim=0), kv_cache["resid_post", -1], f"expand_neurons={expand}")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"layer": -1},
        {"layer": 1, "incl_remainder": True},
        {"layer": -1, "apply_ln": True},
        {"layer": 2, "neuron_slice": [0, 5], "incl_remainder": True, "apply_ln": True},
        {"layer": 1, "neuron_slice": (10, 14), "pos_slice": -1, "apply_ln": True},
    ],
)
def test_stack_neuron_results(ppair: Pair, kwargs: dict[str, Any]) -> None:
    _compare(ppair, "stack_neuron_results", return_labels=True, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"layer": 0},
        {"layer": 1, "mlp_input": True},
        {"layer": -1, "pos_slice": -1},
        {"layer": 1, "batch_slice": [1, 0]},
        {"recompute_ln": True},
    ],
)
def test_apply_ln_to_stack(ppair: Pair, kwargs: dict[str, Any]) -> None:
    gen = torch.Generator().manual_seed(3)
    pos = 1 if kwargs.get("pos_slice") == -1 else TOKENS.shape[1]
    stack = torch.randn((3, 2, pos, ppair.kv.cfg.d_model), generator=gen)
    if pos == 1:
        stack = stack[:, :, 0]
    _compare(ppair, "apply_ln_to_stack", stack, **kwargs)


def test_logit_attrs(ppair: Pair) -> None:
    kv_cache, tl_cache = _caches(ppair)
    kv_stack = kv_cache.decompose_resid(apply_ln=True)
    tl_stack = tl_cache.decompose_resid(apply_ln=True)
    right = random_tokens(7, *TOKENS.shape)
    wrong = random_tokens(8, *TOKENS.shape)
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
        ((right,), {}),
        ((right,), {"incorrect_tokens": wrong}),
        ((5,), {"incorrect_tokens": 9}),
    ]
    for args, kwargs in calls:
        kv = kv_cache.logit_attrs(kv_stack, *args, **kwargs)
        tl = tl_cache.logit_attrs(tl_stack, *args, **kwargs)
        assert_same(kv, tl, f"logit_attrs {kwargs}")
    # The logit lens at the last position, one token pair per batch row.
    last_kv = kv_cache.accumulated_resid(apply_ln=True, pos_slice=-1)
    last_tl = tl_cache.accumulated_resid(apply_ln=True, pos_slice=-1)
    kv = kv_cache.logit_attrs(last_kv, right[:, -1], wrong[:, -1], pos_slice=-1)
    tl = tl_cache.logit_attrs(last_tl, right[:, -1], wrong[:, -1], pos_slice=-1)
    assert_same(kv, tl, "last position")


STACKED = (
    "W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O",
    "W_in", "W_out", "b_in", "b_out", "W_gate", "W_U", "b_U", "W_E",
)  # fmt: skip


def test_stacked_weights(ppair: Pair) -> None:
    for name in STACKED:
        kv, tl = getattr(ppair.kv, name), getattr(ppair.tl, name)
        if tl is None:  # W_gate of a plain MLP
            assert kv is None, name
            continue
        assert_same(kv, tl, f"model.{name}")


def test_circuits(ppair: Pair) -> None:
    for name in ("QK", "OV"):
        kv, tl = getattr(ppair.kv, name), getattr(ppair.tl, name)
        assert kv.shape == tl.shape and kv.mdim == tl.mdim
        assert_same(kv.AB, tl.AB, f"model.{name}.AB")
        kv_block = getattr(ppair.kv.blocks[1].attn, name)
        tl_block = getattr(ppair.tl.blocks[1].attn, name)
        assert_same(kv_block.AB, tl_block.AB, f"blocks.1.attn.{name}.AB")


@pytest.mark.parametrize(
    ("layer", "mlp_input", "include_mlp_biases"),
    [(0, False, True), (0, True, True), (1, False, True), (1, True, False), (2, False, False)],
)
def test_accumulated_bias(
    ppair: Pair, layer: int, mlp_input: bool, include_mlp_biases: bool
) -> None:
    kv = ppair.kv.accumulated_bias(layer, mlp_input, include_mlp_biases)
    tl = ppair.tl.accumulated_bias(layer, mlp_input, include_mlp_biases)
    assert_same(kv, tl, "accumulated_bias")
