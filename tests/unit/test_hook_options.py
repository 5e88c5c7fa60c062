"""TransformerLens's hook options (``set_use_*``) on a loaded model: hook points come and go,
fire in cached decode steps and in ``generate``, and leave the fused native layer in use while
nothing observes the block."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from tests.helpers import model_pair, tokens_for

import kvlens.components.decode_plan as plan_module
from kvlens import ModelConfig
from kvlens.cache import KeyValueCache
from kvlens.kernels import build
from kvlens.model import HookedTransformer

OPTIONS = ("attn_result", "split_qkv_input", "attn_in", "hook_mlp_in", "hook_tokens")
BLOCK_POINTS = {
    "attn_result": ("attn.hook_result",),
    "split_qkv_input": ("hook_q_input", "hook_k_input", "hook_v_input"),
    "attn_in": ("hook_attn_in",),
    "hook_mlp_in": ("hook_mlp_in",),
}
# Multi-head (gpt2, pythia) and grouped-query (llama) models; use_attn_in needs multi-head.
FAMILIES = ("gpt2", "pythia", "llama")


def _model(family: str, *options: str) -> HookedTransformer:
    model = copy.deepcopy(model_pair(family)[1])
    for option in options:
        getattr(model, f"set_use_{option}")(True)
    return model


def _allowed(model: HookedTransformer) -> tuple[str, ...]:
    gqa = model.cfg.n_key_value_heads is not None
    return tuple(o for o in OPTIONS if not (o == "attn_in" and gqa))


def _new_points(model: HookedTransformer) -> list[str]:
    names = [
        f"blocks.{i}.{suffix}"
        for i in range(model.cfg.n_layers)
        for option, suffixes in BLOCK_POINTS.items()
        if getattr(model.cfg, f"use_{option}")
        for suffix in suffixes
    ]
    return names + (["hook_tokens"] if model.cfg.use_hook_tokens else [])


def test_options_are_config_fields_outside_the_fingerprint() -> None:
    cfg = ModelConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, n_ctx=8, d_vocab=10)
    changed = cfg.replace(**{f"use_{o}": True for o in OPTIONS})
    assert changed.fingerprint() == cfg.fingerprint()
    assert ModelConfig.from_dict(changed.to_dict()) == changed
    with pytest.raises(ValueError, match="use_attn_in"):
        cfg.replace(n_key_value_heads=1, use_attn_in=True)
    with pytest.raises(ValueError, match="use_hook_mlp_in must be a bool"):
        cfg.replace(use_hook_mlp_in=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_set_use_declares_and_drops_hook_points(family: str) -> None:
    model = _model(family)
    before = set(model.hook_dict)
    options = _allowed(model)
    for option in options:
        getattr(model, f"set_use_{option}")(True)
        assert getattr(model.cfg, f"use_{option}") is True
    new = _new_points(model)
    assert set(model.hook_dict) == before | set(new)
    assert all(model.hook_dict[name].name == name for name in new)
    model.add_hook(new[0], lambda t, hook: None)  # survives the next option's re-indexing
    model.set_use_hook_tokens(False)
    assert model.hook_dict[new[0]].fwd_hooks
    for option in options:
        getattr(model, f"set_use_{option}")(False)
    assert set(model.hook_dict) == before
    with pytest.raises(TypeError, match="takes a bool"):
        model.set_use_attn_result(1)  # type: ignore[arg-type]


def test_attn_in_refused_under_grouped_query_attention() -> None:
    model = _model("llama")
    with pytest.raises(ValueError, match="use_split_qkv_input instead"):
        model.set_use_attn_in(True)
    assert not model.cfg.use_attn_in and "blocks.0.hook_attn_in" not in model.hook_dict


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_cached_steps_fire_the_new_hooks_as_uncached(family: str) -> None:
    """Prefill, then one token per step: each new hook sees the uncached run's positions."""
    model = _model(family)
    tokens = tokens_for(40, 2, 7)
    early = KeyValueCache.init_cache(model.cfg, None, batch_size=2)
    model(tokens[:, :4], past_kv_cache=early)  # filled before the options: it still fits
    for option in _allowed(model):
        getattr(model, f"set_use_{option}")(True)
    names = _new_points(model)
    cache = KeyValueCache.init_cache(model.cfg, None, batch_size=2)
    _, prefill = model.run_with_cache(tokens[:, :4], past_kv_cache=cache, names_filter=names)
    full_logits, full = model.run_with_cache(tokens, names_filter=names)
    for name in names:
        torch.testing.assert_close(prefill[name], full[name][:, :4], atol=1e-5, rtol=1e-5)
    for pos in range(4, 7):
        logits, step = model.run_with_cache(
            tokens[:, pos : pos + 1], past_kv_cache=early, names_filter=names
        )
        torch.testing.assert_close(logits[:, 0], full_logits[:, pos], atol=1e-4, rtol=1e-5)
        for name in names:
            assert step[name].shape[1] == 1, name
            torch.testing.assert_close(
                step[name], full[name][:, pos : pos + 1], atol=1e-5, rtol=1e-5
            )


def _zero_head_1(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
    tensor = tensor.clone()
    tensor[:, :, 1] = 0.0
    return tensor


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_generate_with_a_result_hook_matches_uncached(family: str) -> None:
    model = _model(family, "attn_result")
    prompt = tokens_for(41, 2, 4)
    calls: list[int] = []

    def ablate(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
        calls.append(tensor.shape[1])
        return _zero_head_1(tensor, hook)

    outs = []
    for use_cache in (True, False):
        with model.hooks(fwd_hooks=[("blocks.0.attn.hook_result", ablate)]):
            outs.append(
                model.generate(
                    prompt,
                    max_new_tokens=5,
                    do_sample=False,
                    use_past_kv_cache=use_cache,
                    verbose=False,
                    stop_at_eos=False,
                )
            )
        if use_cache:
            assert calls.count(1) == 4  # one new token per decode step
    assert torch.equal(outs[0], outs[1])
    plain = model.generate(
        prompt, max_new_tokens=5, do_sample=False, verbose=False, stop_at_eos=False
    )
    assert not torch.equal(plain, outs[0])  # the ablation mattered


def _spy_native(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    taken: list[bool] = []  # one entry per native layer call: whether it ran
    original = plan_module.decode_layer

    def spy(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(plan_module, "decode_layer", spy)
    return taken


@pytest.mark.parametrize("family", FAMILIES)
def test_options_alone_keep_the_native_plan(family: str) -> None:
    model = _model(family)
    for option in _allowed(model):
        getattr(model, f"set_use_{option}")(True)
    assert all(block.decode_plan is not None for block in model.blocks)
    for name in _new_points(model):
        if not name.startswith("blocks.1."):
            continue
        with model.hooks(fwd_hooks=[(name, lambda t, hook: None)]):
            assert model.blocks[0].decode_plan is not None
            assert model.blocks[1].decode_plan is None
            assert name in str(model.blocks[1].decode_plan_reason)
    with model.hooks(fwd_hooks=[("hook_tokens", lambda t, hook: None)]):
        assert all(block.decode_plan is not None for block in model.blocks)


@pytest.mark.skipif(not build.available(), reason="native kernels not built here")
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_native_steps_equal_op_by_op_steps(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With every option on and nothing attached, decode steps run natively and equal the op-by-op
    path (which computes per head, as TL does: equal up to float rounding)."""
    model = _model(family)
    for option in _allowed(model):
        getattr(model, f"set_use_{option}")(True)
    taken = _spy_native(monkeypatch)
    tokens = tokens_for(42, 2, 7)
    logits = {}
    for native in (True, False):
        cache = KeyValueCache.init_cache(model.cfg, None, batch_size=2)
        model(tokens[:, :4], past_kv_cache=cache)
        # An observer on every block's attn_out sends each block op by op.
        observe = [] if native else [(lambda n: n.endswith("hook_attn_out"), lambda t, hook: None)]
        with model.hooks(fwd_hooks=observe):
            logits[native] = torch.cat(
                [model(tokens[:, p : p + 1], past_kv_cache=cache) for p in range(4, 7)], dim=1
            )
        n_calls = 3 * model.cfg.n_layers
        assert taken == ([True] * n_calls if native else []), native
        taken.clear()
    torch.testing.assert_close(logits[True], logits[False], atol=1e-5, rtol=1e-5)
