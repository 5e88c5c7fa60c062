"""``run_with_cache`` and ``run_with_hooks``: the same hook names, shapes, values and order."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from tests.compat.pairs import Pair, assert_same, random_tokens

# Hook points TL 2.18 declares on every HookedTransformer but fires only when a config flag
# turns them on (use_attn_result, use_split_qkv_input, use_attn_in, use_hook_mlp_in). kvlens
# declares them only while the option is on (test_tl_hook_options.py). (hook_tokens is declared
# only under use_hook_tokens.)
TL_OPT_IN = (
    "attn.hook_result",
    "hook_attn_in",
    "hook_q_input",
    "hook_k_input",
    "hook_v_input",
    "hook_mlp_in",
)


def _fired(model: Any, tokens: torch.Tensor) -> list[str]:
    """Hook names in the order they fire during one forward pass (repeats kept)."""
    order: list[str] = []

    def record(tensor: torch.Tensor, hook: Any) -> None:
        order.append(hook.name)

    model.run_with_hooks(tokens, fwd_hooks=[(lambda name: True, record)])
    return order


def test_hook_names(pair: Pair) -> None:
    """kvlens declares and fires exactly the hooks TL fires by default."""
    tokens = random_tokens(0, 2, 7)
    _, kv_cache = pair.kv.run_with_cache(tokens)
    _, tl_cache = pair.tl.run_with_cache(tokens)
    assert set(kv_cache.keys()) == set(tl_cache.keys())
    assert set(pair.kv.hook_dict) == set(kv_cache.keys())
    tl_silent = set(pair.tl.hook_dict) - set(tl_cache.keys())
    expected = {f"blocks.{i}.{s}" for i in range(pair.kv.cfg.n_layers) for s in TL_OPT_IN}
    assert tl_silent == expected
    assert set(pair.kv.hook_dict) <= set(pair.tl.hook_dict)


def test_parallel_blocks_have_no_resid_mid(pair: Pair) -> None:
    """Neither library declares ``hook_resid_mid`` on a parallel attention+MLP block (2.18)."""
    has_mid_kv = "blocks.0.hook_resid_mid" in pair.kv.hook_dict
    has_mid_tl = "blocks.0.hook_resid_mid" in pair.tl.hook_dict
    assert has_mid_kv == has_mid_tl == (not pair.kv.cfg.parallel_attn_mlp)


def test_every_activation(pair: Pair) -> None:
    tokens = random_tokens(1, 2, 9)
    kv_logits, kv_cache = pair.kv.run_with_cache(tokens)
    tl_logits, tl_cache = pair.tl.run_with_cache(tokens)
    assert_same(kv_logits, tl_logits, "logits")
    for name in sorted(tl_cache.keys()):
        assert_same(kv_cache[name], tl_cache[name], name)


def test_fast_attention_path(pair: Pair) -> None:
    """With no score or pattern hook, kvlens's fused attention still gives TL's residuals."""
    tokens = random_tokens(2, 2, 9)

    def resid(name: str) -> bool:
        return "resid" in name or name.endswith("hook_z")

    _, kv_cache = pair.kv.run_with_cache(tokens, names_filter=resid)
    _, tl_cache = pair.tl.run_with_cache(tokens, names_filter=resid)
    assert set(kv_cache.keys()) == set(tl_cache.keys())
    for name in sorted(tl_cache.keys()):
        assert_same(kv_cache[name], tl_cache[name], name)


@pytest.mark.parametrize(
    "names_filter",
    [
        "blocks.1.attn.hook_pattern",
        ["blocks.0.hook_resid_post", "hook_embed"],
        lambda name: name.endswith("hook_v"),
    ],
    ids=["str", "list", "callable"],
)
def test_names_filter(pair: Pair, names_filter: Any) -> None:
    tokens = random_tokens(3, 1, 5)
    _, kv_cache = pair.kv.run_with_cache(tokens, names_filter=names_filter)
    _, tl_cache = pair.tl.run_with_cache(tokens, names_filter=names_filter)
    assert sorted(kv_cache.keys()) == sorted(tl_cache.keys())


def test_unknown_hook_name_in_filter(pair: Pair) -> None:
    """Pinned difference: TL skips a listed name no hook point has; kvlens raises naming it."""
    tokens = random_tokens(4, 1, 4)
    _, tl_cache = pair.tl.run_with_cache(tokens, names_filter=["blocks.0.hook_resid_typo"])
    assert len(tl_cache.keys()) == 0
    with pytest.raises(ValueError, match="hook_resid_typo"):
        pair.kv.run_with_cache(tokens, names_filter=["blocks.0.hook_resid_typo"])


def test_short_activation_names(pair: Pair) -> None:
    from transformer_lens import utils

    from kvlens.hooks import get_act_name

    tokens = random_tokens(5, 1, 5)
    _, kv_cache = pair.kv.run_with_cache(tokens)
    _, tl_cache = pair.tl.run_with_cache(tokens)
    keys: list[tuple[Any, ...]] = [
        ("resid_pre", 1),
        ("resid_post", 0),
        ("attn_out", 1),
        ("mlp_out", 0),
        ("q", 0),
        ("k", 1),
        ("v", 0),
        ("z", 1),
        ("attn_scores", 0),
        ("pattern", 1),
        ("pre", 0),
        ("post", 1),
        ("normalized", 1, "ln2"),
    ]
    for key in keys:
        assert get_act_name(*key) == utils.get_act_name(*key)
        assert_same(kv_cache[key], tl_cache[key], str(key))
    assert get_act_name("embed") == utils.get_act_name("embed")
    assert get_act_name("normalized") == utils.get_act_name("normalized")


# TL's other spellings of hook names kvlens has: aliases, the norms' "scale", the gated MLP's
# "pre_linear", and the compact "<name><layer><type>" form.
TL_SHORT_NAMES: list[tuple[Any, ...]] = [
    ("scale", 1, "ln1"),
    ("scale", 0, "ln2"),
    ("scale",),
    ("pre_linear", 1),
    ("attn", 1),
    ("attn_logits", 0),
    ("key", 1),
    ("query", 0),
    ("value", 1),
    ("mlp_pre", 0),
    ("mlp_post", 1),
    ("k1",),
    ("scale0ln2",),
    ("pre1",),
]


def test_tl_short_name_spellings() -> None:
    from transformer_lens import utils

    from kvlens.hooks import get_act_name

    def kvlens_name(key: tuple[Any, ...]) -> str:
        try:
            return get_act_name(*key)
        except KeyError:
            return "KeyError"

    wrong = {key: kvlens_name(key) for key in TL_SHORT_NAMES}
    wrong = {k: v for k, v in wrong.items() if v != utils.get_act_name(*k)}
    assert not wrong, f"kvlens names these differently from TL: {wrong}"


def test_normalized_without_layer_type() -> None:
    """Pinned difference: ``get_act_name("normalized", 1)`` means ``ln1``'s in kvlens.

    TL 2.18 gives ``blocks.1.hook_normalized``, which no model has; kvlens picks ``ln1``.
    """
    from transformer_lens import utils

    from kvlens.hooks import get_act_name

    assert utils.get_act_name("normalized", 1) == "blocks.1.hook_normalized"
    assert get_act_name("normalized", 1) == "blocks.1.ln1.hook_normalized"


def test_short_cache_keys_without_a_tuple(pair: Pair) -> None:
    """TL's cache also takes a short name alone and a negative layer index."""
    tokens = random_tokens(5, 1, 5)
    _, kv_cache = pair.kv.run_with_cache(tokens)
    _, tl_cache = pair.tl.run_with_cache(tokens)
    for key in ("embed", "normalized", ("resid_post", -1), ("pattern", -2)):
        assert_same(kv_cache[key], tl_cache[key], str(key))


def test_hook_order(pair: Pair) -> None:
    """Hooks fire in TL's order; TL alone fires ``ln1``'s hooks three times per block.

    Pinned difference: TL's block normalizes the residual once for each of the query, key and
    value inputs (so that ``hook_q_input``/``hook_k_input``/``hook_v_input`` can differ), which
    fires ``ln1.hook_scale`` and ``ln1.hook_normalized`` three times; kvlens normalizes once.
    """
    tokens = random_tokens(6, 1, 5)
    kv_order = _fired(pair.kv, tokens)
    tl_order = _fired(pair.tl, tokens)
    assert kv_order == list(dict.fromkeys(tl_order))  # TL's order, first firings only
    assert len(kv_order) == len(set(kv_order))
    for i in range(pair.kv.cfg.n_layers):
        for point in ("ln1.hook_scale", "ln1.hook_normalized"):
            assert tl_order.count(f"blocks.{i}.{point}") == 3
        assert tl_order.count(f"blocks.{i}.ln2.hook_normalized") == 1


def _ablate_kv_head(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
    tensor = tensor.clone()
    tensor[:, :, 1] = 0.0
    return tensor


def _sharpen(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
    return tensor * 2.0


def _first_token_only(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
    out = torch.zeros_like(tensor)
    out[..., 0] = 1.0
    return out


def _observe(tensor: torch.Tensor, hook: Any) -> None:
    return None


INTERVENTIONS: dict[str, tuple[str, Callable[..., Any]]] = {
    "ablate_v_head": ("blocks.0.attn.hook_v", _ablate_kv_head),
    "ablate_z_head": ("blocks.1.attn.hook_z", _ablate_kv_head),
    "scale_scores": ("blocks.0.attn.hook_attn_scores", _sharpen),
    "replace_pattern": ("blocks.1.attn.hook_pattern", _first_token_only),
    "scale_mlp_post": ("blocks.0.mlp.hook_post", _sharpen),
    "scale_ln2": ("blocks.1.ln2.hook_normalized", _sharpen),
    "observe_only": ("blocks.0.hook_attn_out", _observe),
}


@pytest.mark.parametrize("name", list(INTERVENTIONS))
def test_interventions(pair: Pair, name: str) -> None:
    """A hook that edits an activation changes both models' logits the same way."""
    point, fn = INTERVENTIONS[name]
    tokens = random_tokens(7, 2, 8)
    kv = pair.kv.run_with_hooks(tokens, fwd_hooks=[(point, fn)])
    tl = pair.tl.run_with_hooks(tokens, fwd_hooks=[(point, fn)])
    assert_same(kv, tl, f"logits with {name}")
    if fn is not _observe:
        assert not torch.allclose(tl, pair.tl(tokens), atol=1e-3)


@pytest.mark.parametrize(
    "options",
    [
        {"remove_batch_dim": True},
        {"pos_slice": -1},
        {"pos_slice": (1, 4)},
        {"pos_slice": [0, 2]},
        {"device": "cpu", "return_cache_object": False},
    ],
    ids=["remove_batch_dim", "pos_int", "pos_range", "pos_list", "dict"],
)
def test_run_with_cache_options(pair: Pair, options: dict[str, Any]) -> None:
    tokens = random_tokens(8, 1, 5)

    def names(name: str) -> bool:
        return name.endswith(("hook_z", "hook_pattern", "resid_post", "hook_embed"))

    kv_out, kv_cache = pair.kv.run_with_cache(tokens, names_filter=names, **options)
    tl_out, tl_cache = pair.tl.run_with_cache(tokens, names_filter=names, **options)
    assert_same(kv_out, tl_out, "logits")
    if options.get("return_cache_object") is False:
        assert isinstance(kv_cache, dict) and isinstance(tl_cache, dict)
    assert sorted(kv_cache.keys()) == sorted(tl_cache.keys())
    for name in sorted(tl_cache.keys()):
        assert_same(kv_cache[name], tl_cache[name], name)
