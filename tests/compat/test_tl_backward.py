"""Backward hooks: gradients at hook points, as ``run_with_hooks(bwd_hooks=...)`` and
``run_with_cache(incl_bwd=True)`` give them in TL."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tests.compat.pairs import Pair, assert_same, random_tokens

POINTS = (
    "hook_embed",
    "blocks.0.attn.hook_v",
    "blocks.0.attn.hook_pattern",
    "blocks.1.attn.hook_z",
    "blocks.0.mlp.hook_post",
    "blocks.1.hook_resid_pre",
    "blocks.1.hook_resid_post",
    "ln_final.hook_normalized",
)


def _grads_with_bwd_hooks(model: Any, tokens: torch.Tensor, points: tuple[str, ...]) -> dict:
    grads: dict[str, list[torch.Tensor]] = {}

    def record(grad: torch.Tensor, hook: Any) -> None:
        grads.setdefault(hook.name, []).append(grad.detach().clone())

    loss = model.run_with_hooks(
        tokens,
        return_type="loss",
        bwd_hooks=[(name, record) for name in points],
        reset_hooks_end=False,  # TL's documented way: keep the hooks until backward has run
    )
    loss.backward()
    model.reset_hooks()
    return grads


def test_bwd_hook_gradients(pair: Pair) -> None:
    tokens = random_tokens(0, 2, 7)
    kv = _grads_with_bwd_hooks(pair.kv, tokens, POINTS)
    tl = _grads_with_bwd_hooks(pair.tl, tokens, POINTS)
    assert sorted(kv) == sorted(tl) == sorted(POINTS)
    for name in POINTS:
        assert len(kv[name]) == len(tl[name]) == 1, name
        assert_same(kv[name][0], tl[name][0], f"gradient at {name}")


def test_parameter_gradients(pair: Pair) -> None:
    tokens = random_tokens(1, 2, 7)
    pair.kv(tokens, return_type="loss").backward()
    pair.tl(tokens, return_type="loss").backward()
    assert_same(pair.kv.embed.W_E.grad, pair.tl.embed.W_E.grad, "W_E.grad")
    assert_same(pair.kv.unembed.W_U.grad, pair.tl.unembed.W_U.grad, "W_U.grad")
    assert_same(pair.kv.ln_final.w.grad, pair.tl.ln_final.w.grad, "ln_final.w.grad")


def test_bwd_hook_edits_gradient(pair: Pair) -> None:
    """A backward hook's return value replaces the gradient flowing on."""

    def halve(grad: torch.Tensor, hook: Any) -> torch.Tensor:
        return grad * 0.5

    tokens = random_tokens(2, 2, 7)
    for model in (pair.kv, pair.tl):
        loss = model.run_with_hooks(
            tokens,
            return_type="loss",
            bwd_hooks=[("blocks.1.hook_resid_pre", halve)],
            reset_hooks_end=False,
        )
        loss.backward()
        model.reset_hooks()
    assert_same(pair.kv.embed.W_E.grad, pair.tl.embed.W_E.grad, "W_E.grad after the edit")
    plain = pair.tl.embed.W_E.grad.clone()
    pair.tl.zero_grad(set_to_none=True)
    pair.tl(tokens, return_type="loss").backward()
    assert not torch.allclose(plain, pair.tl.embed.W_E.grad)


def test_bwd_hooks_detached_at_end(pair: Pair) -> None:
    """With ``reset_hooks_end=True`` a backward hook still fires for that run, on no later one.

    TL warns that the hooks are removed "before a backward pass can occur", but torch captured
    them when the forward pass ran, so a backward pass through that output fires them.
    """
    tokens = random_tokens(3, 1, 5)
    seen = {}
    for model in (pair.kv, pair.tl):
        fired: list[str] = []
        loss = model.run_with_hooks(
            tokens,
            return_type="loss",
            bwd_hooks=[("blocks.0.hook_resid_post", lambda g, hook, f=fired: f.append(hook.name))],
        )
        loss.backward()
        model(tokens, return_type="loss").backward()
        seen[type(model).__module__] = fired
    assert list(seen.values()) == [["blocks.0.hook_resid_post"]] * 2


def test_run_with_cache_incl_bwd(pair: Pair) -> None:
    """``incl_bwd=True`` runs backward on the loss and records ``<name>_grad`` for every hook.

    ``ln1``'s gradients are left out here: TL records one of three (see the next test).
    """
    tokens = random_tokens(4, 2, 7)
    kv_loss, kv_cache = pair.kv.run_with_cache(tokens, return_type="loss", incl_bwd=True)
    tl_loss, tl_cache = pair.tl.run_with_cache(tokens, return_type="loss", incl_bwd=True)
    assert_same(kv_loss, tl_loss, "loss")
    assert set(kv_cache.keys()) == set(tl_cache.keys())
    grads = [name for name in sorted(tl_cache.keys()) if name.endswith("_grad")]
    assert len(grads) == len(pair.kv.hook_dict)
    for name in grads:
        if ".ln1." not in name:
            assert_same(kv_cache[name], tl_cache[name], name)
    assert pair.tl.embed.W_E.grad is not None and pair.kv.embed.W_E.grad is not None
    assert_same(pair.kv.embed.W_E.grad, pair.tl.embed.W_E.grad, "W_E.grad")


@pytest.mark.parametrize("point", ["hook_normalized", "hook_scale"])
def test_ln1_gradient_is_the_sum_of_tl_paths(pair: Pair, point: str) -> None:
    """Pinned difference: TL fires ``ln1``'s backward hooks once per q/k/v input; kvlens once.

    TL normalizes the residual three times per block (for the query, key and value inputs), so
    a backward hook on ``ln1.hook_normalized`` sees three partial gradients and
    ``run_with_cache(incl_bwd=True)`` keeps whichever came last. kvlens normalizes once; its one
    gradient is the sum of TL's three.
    """
    tokens = random_tokens(5, 2, 7)
    name = f"blocks.0.ln1.{point}"
    kv = _grads_with_bwd_hooks(pair.kv, tokens, (name,))[name]
    tl = _grads_with_bwd_hooks(pair.tl, tokens, (name,))[name]
    assert len(kv) == 1 and len(tl) == 3
    assert_same(kv[0], torch.stack(tl).sum(0), f"{name} gradient")
