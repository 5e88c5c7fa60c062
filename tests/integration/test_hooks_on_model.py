"""Every hook point fires, with TransformerLens's shapes, in cached and uncached runs; identity
hooks change nothing; edits at ``hook_k``/``hook_v`` are what the cache keeps."""

from __future__ import annotations

import pytest
import torch
from tests.helpers import FAMILIES, model_pair, tokens_for

from kvlens.cache import KeyValueCache
from kvlens.hooks import HookPoint
from kvlens.model import HookedTransformer


@pytest.fixture(params=FAMILIES)
def model(request: pytest.FixtureRequest) -> HookedTransformer:
    return model_pair(request.param)[1]


def expected_shape(model: HookedTransformer, name: str, batch: int, n: int, kv: int) -> tuple:
    cfg = model.cfg
    suffix = name.rsplit(".", 1)[-1]
    if suffix in ("hook_attn_scores", "hook_pattern"):
        return (batch, cfg.n_heads, n, kv)
    if suffix in ("hook_q", "hook_rot_q", "hook_z"):
        return (batch, n, cfg.n_heads, cfg.d_head)
    if suffix in ("hook_k", "hook_v", "hook_rot_k"):
        return (batch, n, cfg.n_kv_heads, cfg.d_head)
    if suffix in ("hook_pre", "hook_pre_linear", "hook_post"):
        return (batch, n, cfg.d_mlp_resolved)
    if suffix == "hook_scale":
        return (batch, n, 1)
    return (batch, n, cfg.d_model)


@torch.no_grad()
def test_every_hook_fires_with_consistent_shapes(model: HookedTransformer) -> None:
    tokens = tokens_for(20, 2, 7)
    _, full = model.run_with_cache(tokens)
    cache = KeyValueCache.init_cache(model.cfg, None, batch_size=2)
    _, prefill = model.run_with_cache(tokens[:, :5], past_kv_cache=cache)
    _, step = model.run_with_cache(tokens[:, 5:], past_kv_cache=cache)
    names = set(model.hook_dict)
    assert set(full) == set(prefill) == set(step) == names
    for name in names:
        assert full[name].shape == expected_shape(model, name, 2, 7, 7), name
        assert prefill[name].shape == expected_shape(model, name, 2, 5, 5), name
        assert step[name].shape == expected_shape(model, name, 2, 2, 7), name
        # The cached step sees what the uncached run sees at the same positions.
        last = full[name][:, :, 5:] if name.endswith(("scores", "pattern")) else full[name][:, 5:]
        if name.endswith("scores"):
            finite = last.isfinite()
            assert torch.equal(finite, step[name].isfinite()), name
            last, got = last[finite], step[name][finite]
        else:
            got = step[name]
        assert torch.allclose(got, last, atol=1e-5), name


@torch.no_grad()
def test_cache_holds_keys_as_hooks_leave_them(model: HookedTransformer) -> None:
    tokens = tokens_for(21, 2, 6)
    cache = KeyValueCache.init_cache(model.cfg, None, batch_size=2)
    _, acts = model.run_with_cache(tokens, past_kv_cache=cache)
    rotary = model.cfg.positional_embedding_type == "rotary"
    for i, entry in enumerate(cache.entries):
        keys = acts[f"blocks.{i}.attn.hook_rot_k" if rotary else f"blocks.{i}.attn.hook_k"]
        assert torch.equal(entry.past_keys, keys)
        assert torch.equal(entry.past_values, acts[f"blocks.{i}.attn.hook_v"])


def _identity(tensor: torch.Tensor, *, hook: HookPoint) -> torch.Tensor:
    return tensor


@torch.no_grad()
def test_identity_hooks_change_nothing(model: HookedTransformer) -> None:
    tokens = tokens_for(22, 2, 8)
    expected = model(tokens)
    # Hooks that leave the computation on its fused path: bit-identical.
    switches = ("attn_scores", "pattern", "hook_scale")
    fast_path = [n for n in model.hook_dict if not n.endswith(switches)]
    with model.hooks([(name, _identity) for name in fast_path]):
        assert torch.equal(model(tokens), expected)
    # Hooking scores, pattern or a norm's scale switches that computation to its step-by-step
    # path: equal up to rounding.
    with model.hooks([(lambda name: True, _identity)]):
        assert torch.allclose(model(tokens), expected, atol=1e-5)
        cache = KeyValueCache.init_cache(model.cfg, None, batch_size=2)
        model(tokens[:, :6], past_kv_cache=cache)
        step = model(tokens[:, 6:], past_kv_cache=cache)
    assert torch.allclose(step, expected[:, 6:], atol=1e-5)
    assert all(not point._fns for point in model.hook_dict.values())


@torch.no_grad()
def test_zeroing_a_value_head_in_prefill_reaches_later_steps(model: HookedTransformer) -> None:
    tokens = tokens_for(23, 1, 8)

    def zero_head(v: torch.Tensor, *, hook: HookPoint) -> torch.Tensor:
        v = v.clone()
        v[:, :, 0] = 0
        return v

    def zero_head_before_step(v: torch.Tensor, *, hook: HookPoint) -> torch.Tensor:
        v = v.clone()
        v[:, :7, 0] = 0
        return v

    edited = KeyValueCache.init_cache(model.cfg, None, batch_size=1)
    model.run_with_hooks(
        tokens[:, :7], past_kv_cache=edited, fwd_hooks=[("blocks.0.attn.hook_v", zero_head)]
    )
    assert torch.all(edited[0].past_values[:, :, 0] == 0)
    step_edited = model(tokens[:, 7:], past_kv_cache=edited)
    plain = KeyValueCache.init_cache(model.cfg, None, batch_size=1)
    model(tokens[:, :7], past_kv_cache=plain)
    step_plain = model(tokens[:, 7:], past_kv_cache=plain)
    assert (step_edited - step_plain).abs().max() > 1e-3
    expected = model.run_with_hooks(
        tokens, fwd_hooks=[("blocks.0.attn.hook_v", zero_head_before_step)]
    )[:, 7:]
    assert torch.allclose(step_edited, expected, atol=1e-5)


@torch.no_grad()
def test_pattern_hook_edit_changes_output(model: HookedTransformer) -> None:
    """The eager path really uses the hooked pattern."""
    tokens = tokens_for(24, 1, 6)

    def uniform(pattern: torch.Tensor, *, hook: HookPoint) -> torch.Tensor:
        causal = torch.ones(pattern.shape[-2:]).tril()
        return (causal / causal.sum(-1, keepdim=True)).expand_as(pattern)

    expected = model(tokens)
    edited = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_pattern", uniform)])
    assert (edited - expected).abs().max() > 1e-3
