"""TransformerLens's hook options (``set_use_*``): the same hook points, values, order and
interventions as TL with each option turned on in a loaded model."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from tests.compat.pairs import FAMILIES, Pair, assert_same, model_pair, random_tokens

# Each option and the block-level hook points (suffixes) it turns on.
OPTIONS: dict[str, tuple[str, ...]] = {
    "attn_result": ("attn.hook_result",),
    "split_qkv_input": ("hook_q_input", "hook_k_input", "hook_v_input"),
    "attn_in": ("hook_attn_in",),
    "hook_mlp_in": ("hook_mlp_in",),
}


def _pair_with(family: str, *options: str) -> Pair:
    """A fresh copy of the family's pair with ``options`` turned on on both sides."""
    pair = model_pair(family)
    kv, tl = copy.deepcopy(pair.kv), copy.deepcopy(pair.tl)
    for option in options:
        if option == "hook_tokens":
            _tl_hook_tokens(tl)
            kv.set_use_hook_tokens(True)
            continue
        getattr(kv, f"set_use_{option}")(True)
        getattr(tl, f"set_use_{option}")(True)
    return Pair(family, kv, tl)


def _tl_hook_tokens(tl: Any) -> None:
    """TL has no ``set_use_hook_tokens``: declare its ``hook_tokens`` as its constructor would."""
    from transformer_lens.hook_points import HookPoint

    tl.cfg.use_hook_tokens = True
    tl.hook_tokens = HookPoint()
    tl.setup()


def _options(family: str) -> list[str]:
    """The options TL allows for ``family`` (``use_attn_in`` needs multi-head attention)."""
    return [o for o in OPTIONS if not (o == "attn_in" and family == "llama")]


CASES = [(family, option) for family in FAMILIES for option in _options(family)]


@pytest.mark.parametrize(("family", "option"), CASES)
@torch.no_grad()
def test_option_hooks_match_tl(family: str, option: str) -> None:
    """The option's hooks exist with TL's names, shapes and values; logits stay put."""
    tokens = random_tokens(30, 2, 7)
    before = model_pair(family).kv(tokens)
    pair = _pair_with(family, option)
    kv_logits, kv_cache = pair.kv.run_with_cache(tokens)
    tl_logits, tl_cache = pair.tl.run_with_cache(tokens)
    assert_same(kv_logits, tl_logits, "logits")
    torch.testing.assert_close(kv_logits, before, atol=1e-5, rtol=1e-5)
    for layer in range(pair.kv.cfg.n_layers):
        for suffix in OPTIONS[option]:
            name = f"blocks.{layer}.{suffix}"
            assert name in tl_cache, name
            assert_same(kv_cache[name], tl_cache[name], name)
    assert set(kv_cache.keys()) == set(tl_cache.keys())


@torch.no_grad()
def test_hook_tokens_match_tl() -> None:
    tokens = random_tokens(31, 2, 6)
    pair = _pair_with("gpt2", "hook_tokens")
    kv_logits, kv_cache = pair.kv.run_with_cache(tokens)
    tl_logits, tl_cache = pair.tl.run_with_cache(tokens)
    assert torch.equal(kv_cache["hook_tokens"], tl_cache["hook_tokens"])
    assert_same(kv_logits, tl_logits, "logits")


def _fired(model: Any, tokens: torch.Tensor) -> list[str]:
    order: list[str] = []

    def record(tensor: torch.Tensor, hook: Any) -> None:
        order.append(hook.name)

    model.run_with_hooks(tokens, fwd_hooks=[(lambda name: True, record)])
    return order


ORDER_CASES = [
    ("gpt2", ("attn_result", "hook_mlp_in")),
    ("gpt2", ("split_qkv_input",)),
    ("gpt2", ("attn_in",)),
    ("neox", ("attn_in", "split_qkv_input", "attn_result", "hook_mlp_in", "hook_tokens")),
    ("llama", ("split_qkv_input", "attn_result", "hook_mlp_in")),
]


@pytest.mark.parametrize(("family", "options"), ORDER_CASES)
def test_hook_order(family: str, options: tuple[str, ...]) -> None:
    """TL's firing order; with per-head inputs ``ln1`` fires three times in kvlens too.

    Without them TL still normalizes three times and kvlens once (the pinned difference in
    ``test_tl_activations.py::test_hook_order``), so only first firings are compared.
    """
    pair = _pair_with(family, *options)
    tokens = random_tokens(32, 1, 5)
    kv_order, tl_order = _fired(pair.kv, tokens), _fired(pair.tl, tokens)
    if "split_qkv_input" in options or "attn_in" in options:
        assert kv_order == tl_order
        assert kv_order.count("blocks.0.ln1.hook_normalized") == 3
    else:
        assert kv_order == list(dict.fromkeys(tl_order))


def _zero_head_1(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
    tensor = tensor.clone()
    tensor[:, :, 1] = 0.0
    return tensor


def _ramp(tensor: torch.Tensor) -> torch.Tensor:
    # Not a multiple of the input nor constant along d_model, so the norm keeps the edit.
    return torch.linspace(-2.0, 2.0, tensor.shape[-1])


def _shift_head_0(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
    tensor = tensor.clone()
    tensor[:, :, 0] += _ramp(tensor)
    return tensor


def _add_in_place(tensor: torch.Tensor, hook: Any) -> None:
    tensor += _ramp(tensor)  # in place: the residual stream must not see it (TL hooks a copy)


def _swap_tokens(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
    tensor = tensor.clone()
    tensor[:, 2] = 7
    return tensor


INTERVENTIONS: dict[str, tuple[str, str, Callable[..., Any]]] = {
    "zero_result_head": ("attn_result", "blocks.0.attn.hook_result", _zero_head_1),
    "shift_q_input_head": ("split_qkv_input", "blocks.1.hook_q_input", _shift_head_0),
    "shift_k_input_head": ("split_qkv_input", "blocks.0.hook_k_input", _shift_head_0),
    "zero_v_input_head": ("split_qkv_input", "blocks.0.hook_v_input", _zero_head_1),
    "shift_attn_in_head": ("attn_in", "blocks.0.hook_attn_in", _shift_head_0),
    "add_to_mlp_in": ("hook_mlp_in", "blocks.0.hook_mlp_in", _add_in_place),
    "edit_tokens": ("hook_tokens", "hook_tokens", _swap_tokens),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", INTERVENTIONS)
@torch.no_grad()
def test_interventions(family: str, name: str) -> None:
    """An edit at each new hook point changes the logits as it does in TL."""
    option, point, hook = INTERVENTIONS[name]
    if option == "attn_in" and family == "llama":
        pytest.skip("use_attn_in needs multi-head attention")
    pair = _pair_with(family, option)
    tokens = random_tokens(33, 2, 6)
    plain = pair.kv(tokens)
    kv = pair.kv.run_with_hooks(tokens, fwd_hooks=[(point, hook)])
    tl = pair.tl.run_with_hooks(tokens, fwd_hooks=[(point, hook)])
    assert_same(kv, tl, name)
    assert not torch.allclose(kv, plain, atol=1e-3), f"{name} changed nothing"


@pytest.mark.parametrize("family", FAMILIES)
def test_option_off_removes_hook_points(family: str) -> None:
    """Turned off, the points are gone: TL refuses to add a hook on them (``AssertionError``;
    its ``run_with_hooks`` skips that check, and the hook never fires), kvlens does not know the
    name (``ValueError``)."""
    options = _options(family)
    pair = _pair_with(family, *options)
    for option in options:
        getattr(pair.kv, f"set_use_{option}")(False)
        getattr(pair.tl, f"set_use_{option}")(False)
    tokens = random_tokens(34, 1, 5)
    for suffix in (s for o in options for s in OPTIONS[o]):
        name = f"blocks.0.{suffix}"
        assert name not in pair.kv.hook_dict
        with pytest.raises(ValueError, match="unknown hook point"):
            pair.kv.run_with_hooks(tokens, fwd_hooks=[(name, _zero_head_1)])
        with pytest.raises(AssertionError):
            pair.tl.add_hook(name, _zero_head_1)
    assert _fired(pair.kv, tokens) == list(dict.fromkeys(_fired(pair.tl, tokens)))


def test_attn_in_under_grouped_query_attention() -> None:
    """Both refuse ``use_attn_in`` under grouped-query attention (TL asserts)."""
    pair = _pair_with("llama")
    with pytest.raises(ValueError, match="use_attn_in"):
        pair.kv.set_use_attn_in(True)
    with pytest.raises(AssertionError):
        pair.tl.set_use_attn_in(True)
    assert not pair.kv.cfg.use_attn_in
