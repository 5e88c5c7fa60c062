"""Every hook point fires, with TransformerLens's shapes, in cached and uncached runs; identity
hooks change nothing; edits at ``hook_k``/``hook_v`` are what the cache keeps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from tests.helpers import FAMILIES, model_pair, tokens_for

import kvlens.components.decode_plan as plan_module
from kvlens.cache import KeyValueCache
from kvlens.hooks import HookPoint
from kvlens.kernels import build
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
    assert not any(point.is_observed for point in model.hook_dict.values())


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


def _grad_names(model: HookedTransformer) -> list[str]:
    names = [
        "blocks.0.attn.hook_attn_scores",
        "blocks.0.attn.hook_pattern",
        "blocks.0.ln1.hook_scale",
        "blocks.0.hook_resid_post",
        "blocks.1.attn.hook_v",
        "blocks.1.attn.hook_z",
        "blocks.1.mlp.hook_post",
    ]
    if model.cfg.positional_embedding_type == "rotary":
        names.append("blocks.0.attn.hook_rot_k")
    return names


def _autograd_reference(
    model: HookedTransformer, tokens: torch.Tensor, names: list[str]
) -> dict[str, torch.Tensor]:
    """d loss / d activation by ``torch.autograd.grad``, activations taken by forward hooks."""
    acts: dict[str, torch.Tensor] = {}

    def keep(tensor: torch.Tensor, *, hook: HookPoint) -> None:
        acts[hook.name] = tensor

    with model.hooks([(n, keep) for n in names]):
        loss = model(tokens, return_type="loss")
    grads = torch.autograd.grad(loss, [acts[n] for n in names])
    return dict(zip(names, grads, strict=True))


def test_backward_hooks_receive_the_gradient_of_their_activation(model: HookedTransformer) -> None:
    tokens = tokens_for(25, 2, 6)
    names = _grad_names(model)
    seen: dict[str, torch.Tensor] = {}

    def keep(grad: torch.Tensor, *, hook: HookPoint) -> None:
        seen[hook.name] = grad

    try:
        # Backward hooks alone: the scores, pattern and scale still take their step-by-step path.
        with model.hooks(bwd_hooks=[(n, keep) for n in names]):
            model(tokens, return_type="loss").backward()
    finally:
        model.zero_grad(set_to_none=True)
    expected = _autograd_reference(model, tokens, names)
    assert set(seen) == set(names)
    for name in names:
        torch.testing.assert_close(seen[name], expected[name], msg=name)


def test_a_backward_hook_replaces_the_gradient(model: HookedTransformer) -> None:
    tokens = tokens_for(26, 1, 5)
    name = "blocks.1.hook_resid_pre"

    def embed_grad(**hooks: list) -> torch.Tensor:
        try:
            with model.hooks(**hooks):
                model(tokens, return_type="loss").backward()
            return model.embed.W_E.grad.clone()
        finally:
            model.zero_grad(set_to_none=True)

    plain = embed_grad()
    # W_E's gradient is c + k * b, b the part through the hooked point, k the replacement factor.
    doubled = embed_grad(bwd_hooks=[(name, lambda g, *, hook: 2 * g)])
    blocked = embed_grad(bwd_hooks=[(name, lambda g, *, hook: torch.zeros_like(g))])
    torch.testing.assert_close(embed_grad(bwd_hooks=[(name, lambda g, *, hook: None)]), plain)
    assert not torch.allclose(doubled, plain)
    torch.testing.assert_close(doubled, 2 * plain - blocked)


def test_incl_bwd_caches_gradients_as_name_grad(model: HookedTransformer) -> None:
    tokens = tokens_for(27, 2, 6)
    try:
        loss, cache = model.run_with_cache(tokens, return_type="loss", incl_bwd=True)
    finally:
        model.zero_grad(set_to_none=True)
    assert loss.ndim == 0
    names = set(model.hook_dict)
    assert set(cache) == names | {f"{n}_grad" for n in names}
    expected = _autograd_reference(model, tokens, _grad_names(model))
    for name, grad in expected.items():
        torch.testing.assert_close(cache[f"{name}_grad"], grad, msg=name)
        assert not cache[f"{name}_grad"].requires_grad
    assert not any(point.is_observed for point in model.hook_dict.values())


@torch.no_grad()
def test_remove_batch_dim_and_pos_slice(model: HookedTransformer) -> None:
    tokens = tokens_for(28, 2, 7)
    _, full = model.run_with_cache(tokens)
    _, row = model.run_with_cache(tokens, remove_batch_dim=True)
    assert not row.has_batch_dim and full.has_batch_dim
    for pos_slice, index in (((2, 5), slice(2, 5)), (-1, slice(-1, None)), ([4, 0], [4, 0])):
        _, part = model.run_with_cache(tokens, pos_slice=pos_slice, return_cache_object=False)
        assert type(part) is dict and set(part) == set(full) == set(row)
        for name, act in full.items():
            assert torch.equal(row[name], act[0]), name
            # Scores and pattern: the query axis; every other hook point: its position axis.
            want = act[:, :, index] if name.endswith(("scores", "pattern")) else act[:, index]
            assert torch.equal(part[name], want), (name, pos_slice)


def test_unknown_keywords_name_the_method_called(model: HookedTransformer) -> None:
    tokens = tokens_for(29, 1, 4)
    with pytest.raises(TypeError, match=r"^run_with_cache\(\) got an unexpected keyword .*'foo'"):
        model.run_with_cache(tokens, foo=1)
    with pytest.raises(TypeError, match=r"^run_with_hooks\(\) .* 'return_typ'; did you mean"):
        model.run_with_hooks(tokens, return_typ="loss")
    assert model.context_level == 0
    assert not any(point.is_observed for point in model.hook_dict.values())


def _attach(model: HookedTransformer, kind: str, fired: list[str]) -> Callable[[], None]:
    """Attach one observer of ``kind`` to ``blocks.0.attn.hook_z``; returns its remover."""
    point = model.hook_dict["blocks.0.attn.hook_z"]
    if kind in ("fwd", "bwd"):
        point.add_hook(lambda t, *, hook: fired.append(kind), dir=kind)
        return lambda: point.remove_hooks("both")
    if kind == "torch_pre":
        handle = point.register_forward_pre_hook(lambda m, args: fired.append(kind))
    else:
        handle = point.register_full_backward_hook(lambda m, gin, gout: None)
    return handle.remove


@pytest.mark.skipif(not build.available(), reason="native kernels not built here")
@pytest.mark.parametrize("kind", ["fwd", "bwd", "torch_pre", "torch_full_bwd"])
def test_native_layer_runs_only_where_nothing_observes(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = model_pair("llama")[1]
    taken: list[bool] = []  # one entry per native layer call: whether it ran
    original = plan_module.decode_layer

    def spy(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(plan_module, "decode_layer", spy)
    tokens = tokens_for(30, 1, 6)
    cache = KeyValueCache.init_cache(model.cfg, None, batch_size=1)
    fired: list[str] = []
    with torch.no_grad():
        model(tokens[:, :3], past_kv_cache=cache)
        model(tokens[:, 3:4], past_kv_cache=cache)
        assert taken == [True] * model.cfg.n_layers  # nothing attached: every block native
        taken.clear()
        remove = _attach(model, kind, fired)
        try:
            model(tokens[:, 4:5], past_kv_cache=cache)
        finally:
            remove()
        assert taken == [True] * (model.cfg.n_layers - 1)  # block 0 went op by op
        assert fired == ([kind] if kind in ("fwd", "torch_pre") else [])
        taken.clear()
        model(tokens[:, 5:6], past_kv_cache=cache)  # removed: native again
    assert taken == [True] * model.cfg.n_layers
