"""Hook points and the hooked root module, with TransformerLens 2.18's ``hook_points`` as oracle.

A toy model is built twice with the same weights, once from kvlens's classes and once from TL's;
the same operations on both must fire the same hooks and give the same gradients and caches.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from kvlens.hooks import ActivationCache, HookedRootModule, HookPoint

D = 4  # d_model; the toy attention has 2 heads of 2


@pytest.fixture(scope="module")
def tl() -> Any:
    """TransformerLens's ``hook_points`` module (the tests using it skip without TL)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("transformer_lens.hook_points")


def make_toy(point_cls: type[nn.Module] = HookPoint, root_cls: type[nn.Module] = HookedRootModule):
    """A two-block toy whose hook points have TL's names and shapes; a scalar output."""

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hook_q = point_cls()  # [batch, pos, head, d_head]
            self.hook_rot_q = point_cls()  # [batch, pos, head, d_head]
            self.hook_pattern = point_cls()  # [batch, head, pos, kv_pos]

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(D, D)
            self.attn = Attn()
            self.hook_resid = point_cls()  # [batch, pos, d_model]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q = self.attn.hook_q(self.lin(x).view(*x.shape[:2], 2, 2))
            rot = self.attn.hook_rot_q(q.flip(-1))
            scores = torch.einsum("bqhd,bkhd->bhqk", q, rot)
            pattern = self.attn.hook_pattern(scores.softmax(-1))
            z = torch.einsum("bhqk,bkhd->bqhd", pattern, q).reshape(x.shape)
            return self.hook_resid(x + torch.tanh(z))

    class Toy(root_cls):  # type: ignore[valid-type,misc]
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.embed = nn.Linear(D, D)
            self.hook_embed = point_cls()  # [batch, pos, d_model]
            self.blocks = nn.ModuleList([Block(), Block()])
            self.setup()

        def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            resid = self.hook_embed(self.embed(x))
            for block in self.blocks:
                resid = block(resid)
            return (resid * scale).pow(2).mean()

    return Toy()


def toy_input(batch: int = 2, pos: int = 5) -> torch.Tensor:
    return torch.randn(batch, pos, D, generator=torch.Generator().manual_seed(1))


def tagger(log: list[str]) -> Callable[[str], Callable[..., None]]:
    def tag(label: str) -> Callable[..., None]:
        def hook(tensor: torch.Tensor, *, hook: Any) -> None:
            log.append(f"{label}@{hook.name}")

        return hook

    return tag


def scenario(model: Any) -> list[list[str]]:
    """Add and remove hooks every way TL allows; which hooks fire after each step."""
    log: list[str] = []
    tag = tagger(log)
    fired: list[list[str]] = []

    def probe() -> None:
        model(toy_input()).backward()
        fired.append(list(log))
        log.clear()

    mid = lambda name: name.endswith("hook_resid")  # noqa: E731
    model.add_hook("hook_embed", tag("temp"))
    model.add_hook("hook_embed", tag("pre"), prepend=True)
    model.add_perma_hook("blocks.1.hook_resid", tag("perma"))
    model.add_hook("blocks.0.attn.hook_pattern", tag("bwd"), dir="bwd")
    model.add_hook("blocks.0.attn.hook_pattern", tag("bwd_pre"), dir="bwd", prepend=True)
    model.hook_dict["blocks.0.attn.hook_q"].add_hook(tag("positional_fwd"), "fwd")
    probe()
    with model.hooks(fwd_hooks=[("hook_embed", tag("ctx1"))], bwd_hooks=[(mid, tag("ctx1bwd"))]):
        probe()
        model.reset_hooks()  # every temporary hook, whatever its level
        probe()
        model.add_hook("blocks.0.hook_resid", tag("added_inside"))
        model.add_perma_hook("blocks.0.attn.hook_rot_q", tag("perma_inside"))
        model.add_hook("hook_embed", tag("first"), prepend=True)
        with model.hooks(fwd_hooks=[(mid, tag("ctx2"))]):
            probe()
            with model.hooks(fwd_hooks=[("hook_embed", tag("ctx3"))], reset_hooks_end=False):
                probe()
            probe()
        probe()
        with model.hooks(fwd_hooks=[("hook_embed", tag("ctx2b"))]):
            with model.hooks(bwd_hooks=[("hook_embed", tag("ctx3b"))]):
                probe()
            probe()
        probe()
        model.hook_dict["hook_embed"].remove_hooks("both")
        probe()
    probe()
    model.reset_hooks(level=1)
    probe()
    model.reset_hooks()
    probe()
    model.reset_hooks(including_permanent=True)
    probe()
    return fired


def test_add_and_remove_fire_the_same_hooks_as_transformer_lens(tl: Any) -> None:
    ours = scenario(make_toy())
    theirs = scenario(make_toy(tl.HookPoint, tl.HookedRootModule))
    assert ours == theirs
    assert ours[-1] == []


def test_hooks_removed_inside_a_block_stay_removed() -> None:
    model, log = make_toy(), []
    model.add_hook("hook_embed", tagger(log)("outer"))
    with model.hooks(fwd_hooks=[("hook_embed", tagger(log)("inner"))]):
        model.reset_hooks()
    model(toy_input())
    assert log == []


def test_permanent_hook_added_inside_a_block_survives_it() -> None:
    model, log = make_toy(), []
    with model.hooks():
        model.add_hook("hook_embed", tagger(log)("perma"), is_permanent=True)
    model(toy_input())
    assert log == ["perma@hook_embed"]
    model.reset_hooks()
    model(toy_input())
    assert len(log) == 2
    model.reset_hooks(including_permanent=True)
    assert not model.hook_embed.is_observed


def test_hook_point_add_hook_takes_dir_second_like_transformer_lens() -> None:
    model, log = make_toy(), []
    model.hook_embed.add_hook(tagger(log)("temp"), "fwd")  # temporary, as in TL
    model.reset_hooks()
    model(toy_input())
    assert log == []
    with pytest.raises(ValueError, match="dir"):
        model.hook_embed.add_hook(tagger(log)("x"), "sideways")  # type: ignore[arg-type]


def test_nested_blocks_detach_only_their_own_level() -> None:
    model, log = make_toy(), []
    tag = tagger(log)
    with model.hooks(fwd_hooks=[("hook_embed", tag("outer"))]):
        assert model.context_level == 1
        with model.hooks(fwd_hooks=[("hook_embed", tag("inner"))]):
            assert model.context_level == 2
            model(toy_input())
            assert log == ["outer@hook_embed", "inner@hook_embed"]
        log.clear()
        model(toy_input())
        assert log == ["outer@hook_embed"]
    assert model.context_level == 0 and not model.hook_embed.is_observed


def test_remove_hooks_level_rules_match_transformer_lens(tl: Any) -> None:
    def survivors(point: Any) -> list[tuple[int, str]]:
        log: list[str] = []
        for i, (perm, level) in enumerate([(False, None), (False, 1), (True, 1), (False, 2)]):
            point.add_hook(tagger(log)(str(i)), "fwd", is_permanent=perm, level=level)
            point.add_hook(tagger(log)(str(i)), "bwd", is_permanent=perm, level=level)
        out = []
        for step, kwargs in enumerate(
            [
                {"level": 2},
                {"dir": "bwd", "level": 1},
                {"dir": "fwd"},
                {"including_permanent": True},
            ]
        ):
            point.remove_hooks(**kwargs)
            out += [(step, f"fwd{len(point.fwd_hooks)}"), (step, f"bwd{len(point.bwd_hooks)}")]
        return out

    assert survivors(HookPoint()) == survivors(tl.HookPoint())


def test_hook_point_fast_path_returns_its_input() -> None:
    point, x = HookPoint(), torch.randn(2, 3)
    assert point(x) is x and not point.is_observed
    handle = point.register_forward_pre_hook(lambda module, args: None)
    assert point.is_observed
    handle.remove()
    assert not point.is_observed and point(x) is x


@pytest.mark.parametrize(
    "attach",
    [
        lambda p: p.add_hook(lambda t, *, hook: None),
        lambda p: p.add_hook(lambda t, *, hook: None, dir="bwd"),
        lambda p: p.register_forward_pre_hook(lambda m, a: None),
        lambda p: p.register_forward_hook(lambda m, a, o: None),
        lambda p: p.register_full_backward_hook(lambda m, gi, go: None),
        lambda p: p.register_full_backward_pre_hook(lambda m, go: None),
        lambda p: nn.modules.module.register_module_forward_hook(lambda m, a, o: None),
        lambda p: nn.modules.module.register_module_full_backward_hook(lambda m, gi, go: None),
    ],
    ids=["fwd", "bwd", "pre", "torch_fwd", "full_bwd", "full_bwd_pre", "global", "global_bwd"],
)
def test_every_kind_of_hook_makes_a_point_observed(attach: Callable[[HookPoint], Any]) -> None:
    point = HookPoint()
    handle = attach(point)
    try:
        assert point.is_observed and point.has_hooks
    finally:
        if handle is None:
            point.remove_hooks("both")
        else:
            handle.remove()
    assert not point.is_observed and not point.has_hooks


def test_torch_hooks_on_a_hook_point_fire() -> None:
    model, fired = make_toy(), []
    point = model.blocks[0].hook_resid
    handles = [
        point.register_forward_pre_hook(lambda m, args: fired.append("pre")),
        point.register_forward_hook(lambda m, args, out: fired.append("fwd")),
        point.register_full_backward_hook(lambda m, gin, gout: fired.append("full_bwd")),
        nn.modules.module.register_module_forward_hook(
            lambda m, args, out: fired.append("global") if m is model.hook_embed else None
        ),
    ]
    model.add_hook("blocks.0.hook_resid", lambda t, *, hook: fired.append("kvlens"))
    try:
        model(toy_input()).backward()
    finally:
        for handle in handles:
            handle.remove()
        model.reset_hooks()
    assert fired == ["global", "pre", "kvlens", "fwd", "full_bwd"]


def test_a_torch_pre_hook_alone_fires_and_can_replace_the_input() -> None:
    model = make_toy()
    expected = model(toy_input())
    handle = model.hook_embed.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    try:
        doubled = model(toy_input())
    finally:
        handle.remove()
    assert not torch.allclose(doubled, expected)
    torch.testing.assert_close(model(toy_input()), expected)


def test_a_torch_full_backward_hook_alone_fires() -> None:
    model, grads = make_toy(), []
    point = model.blocks[1].hook_resid
    handle = point.register_full_backward_hook(lambda m, gin, gout: grads.append(gout[0]))
    try:
        model(toy_input()).backward()
    finally:
        handle.remove()
    assert len(grads) == 1 and grads[0].shape == (2, 5, D)


def test_torch_full_backward_hook_sees_the_gradient_a_kvlens_hook_sees() -> None:
    model, seen = make_toy(), {}
    point = model.blocks[0].hook_resid
    handle = point.register_full_backward_hook(lambda m, gin, gout: seen.update(torch=gout[0]))
    model.add_hook("blocks.0.hook_resid", lambda g, *, hook: seen.update(kvlens=g), dir="bwd")
    try:
        model(toy_input()).backward()
    finally:
        handle.remove()
        model.reset_hooks()
    torch.testing.assert_close(seen["torch"], seen["kvlens"])


def test_backward_hooks_see_and_replace_gradients_like_transformer_lens(tl: Any) -> None:
    def run(model: Any) -> tuple[list[torch.Tensor], torch.Tensor]:
        seen: list[torch.Tensor] = []

        def times(k: float | None) -> Callable[..., Any]:
            def hook(grad: torch.Tensor, *, hook: Any) -> torch.Tensor | None:
                seen.append(grad.clone())
                return None if k is None else grad * k

            return hook

        for k in (10.0, None, 3.0):  # each sees the output's gradient; the last tensor wins
            model.add_hook("blocks.0.attn.hook_pattern", times(k), dir="bwd")
        model(toy_input()).backward()
        model.reset_hooks()
        return seen, model.blocks[0].lin.weight.grad

    (ours, our_grad), (theirs, their_grad) = (
        run(make_toy()),
        run(make_toy(tl.HookPoint, tl.HookedRootModule)),
    )
    assert len(ours) == len(theirs) == 3
    for mine, tls in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine, tls)
    torch.testing.assert_close(our_grad, their_grad)


def test_backward_hook_gradient_is_the_autograd_gradient() -> None:
    model, acts, grads = make_toy(), {}, {}
    names = list(model.hook_dict)
    with model.hooks(
        fwd_hooks=[(n, lambda t, *, hook: acts.update({hook.name: t})) for n in names],
        bwd_hooks=[(n, lambda g, *, hook: grads.update({hook.name: g})) for n in names],
    ):
        out = model(toy_input())
        expected = torch.autograd.grad(out, [acts[n] for n in names], retain_graph=True)
        out.backward()
    for name, want in zip(names, expected, strict=True):
        torch.testing.assert_close(grads[name], want, msg=name)


def test_backward_hooks_attached_at_forward_fire_after_a_reset(tl: Any) -> None:
    for model in (make_toy(), make_toy(tl.HookPoint, tl.HookedRootModule)):
        log: list[str] = []
        out = model.run_with_hooks(toy_input(), bwd_hooks=[("hook_embed", tagger(log)("b"))])
        out.backward()
        assert log == ["b@hook_embed"]  # TL's warning says otherwise; its hooks do fire
        model(toy_input()).backward()
        assert log == ["b@hook_embed"]


def test_run_with_hooks_warns_when_bwd_hooks_are_reset(caplog: pytest.LogCaptureFixture) -> None:
    model = make_toy()
    with caplog.at_level(logging.WARNING, logger="kvlens.hooks"):
        model.run_with_hooks(toy_input(), bwd_hooks=[("hook_embed", lambda g, *, hook: None)])
    assert "backward hooks" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kvlens.hooks"):
        model.run_with_hooks(toy_input(), bwd_hooks=[("hook_embed", lambda g, *, hook: None)],
                             reset_hooks_end=False)  # fmt: skip
    assert caplog.text == ""
    model.reset_hooks()


def test_hook_results_are_checked() -> None:
    model = make_toy()
    with pytest.raises(ValueError, match=r"forward hook on 'hook_embed' returned shape \(1,\)"):
        model.run_with_hooks(
            toy_input(), fwd_hooks=[("hook_embed", lambda t, *, hook: t[0, 0, :1])]
        )
    with pytest.raises(TypeError, match="return a Tensor or None"):
        model.run_with_hooks(toy_input(), fwd_hooks=[("hook_embed", lambda t, *, hook: 3)])
    out = model.run_with_hooks(
        toy_input(), bwd_hooks=[("hook_embed", lambda g, *, hook: g[0])], reset_hooks_end=False
    )
    with pytest.raises(ValueError, match="backward hook on 'hook_embed' returned shape"):
        out.backward()
    model.reset_hooks()
    assert not any(p.is_observed for p in model.hook_points())


def test_ctx_persists_until_contexts_are_cleared() -> None:
    model = make_toy()

    def count(t: torch.Tensor, *, hook: HookPoint) -> None:
        hook.ctx["n"] = hook.ctx.get("n", 0) + 1

    model.add_hook("hook_embed", count)
    model(toy_input())
    model(toy_input())
    assert model.hook_embed.ctx == {"n": 2}
    model.reset_hooks(clear_contexts=False)
    assert model.hook_embed.ctx == {"n": 2}
    with model.hooks(fwd_hooks=[("hook_embed", count)]):
        model(toy_input())
    assert model.hook_embed.ctx == {"n": 3}  # hooks() keeps contexts by default
    with model.hooks(fwd_hooks=[("hook_embed", count)], clear_contexts=True):
        model(toy_input())
    assert model.hook_embed.ctx == {}
    model.hook_embed.ctx["x"] = 1
    model.reset_hooks()
    assert model.hook_embed.ctx == {}


def test_layer_is_read_from_the_name() -> None:
    model = make_toy()
    assert model.hook_dict["blocks.1.attn.hook_q"].layer() == 1
    with pytest.raises(ValueError, match="'hook_embed' is not in a layer"):
        model.hook_embed.layer()


def test_a_failing_hooks_block_leaves_nothing_attached() -> None:
    model = make_toy()
    with (
        pytest.raises(ValueError, match="unknown hook point 'hook_embd'"),
        model.hooks(
            fwd_hooks=[("blocks.0.hook_resid", lambda t, *, hook: None), ("hook_embd", print)]
        ),
    ):
        pass  # pragma: no cover
    assert model.context_level == 0
    assert not any(p.is_observed for p in model.hook_points())


@pytest.mark.parametrize("method", ["run_with_cache", "run_with_hooks"])
def test_unknown_keyword_is_refused_before_running(method: str) -> None:
    model, log = make_toy(), []
    hook = ("hook_embed", tagger(log)("x"))
    extra: dict[str, Any] = {"fwd_hooks": [hook]} if method == "run_with_hooks" else {}
    with pytest.raises(
        TypeError, match=rf"^{method}\(\) got an unexpected keyword argument 'scal'"
    ):
        getattr(model, method)(toy_input(), scal=2.0, **extra)
    assert log == [] and model.context_level == 0
    assert not any(p.is_observed for p in model.hook_points())
    out = getattr(model, method)(toy_input(), scale=2.0, **extra)  # forward's own keyword
    out = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(out, model(toy_input(), scale=2.0))


def test_forward_taking_any_keyword_is_not_checked() -> None:
    class Loose(HookedRootModule):
        def __init__(self) -> None:
            super().__init__()
            self.hook_x = HookPoint()
            self.setup()

        def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            return self.hook_x(x) * kwargs.get("k", 1)

    out, cache = Loose().run_with_cache(torch.ones(2), k=3)
    assert torch.equal(out, torch.full((2,), 3.0)) and torch.equal(cache["hook_x"], torch.ones(2))


def test_names_filter_forms() -> None:
    model = make_toy()
    x = toy_input()
    assert set(model.run_with_cache(x)[1]) == set(model.hook_dict)
    assert list(model.run_with_cache(x, names_filter="hook_embed")[1]) == ["hook_embed"]
    names = ["blocks.1.hook_resid", "hook_embed", "hook_embed"]
    assert set(model.run_with_cache(x, names_filter=names)[1]) == {"hook_embed", names[0]}
    _, cache = model.run_with_cache(x, names_filter=lambda n: n.endswith("hook_q"))
    assert set(cache) == {"blocks.0.attn.hook_q", "blocks.1.attn.hook_q"}
    with pytest.raises(ValueError, match=r"unknown hook point 'blocks.0.hook_q'.*did you mean"):
        model.run_with_cache(x, names_filter=["hook_embed", "blocks.0.hook_q"])
    with pytest.raises(TypeError, match="callable filter"):
        model.run_with_cache(x, names_filter=3)  # type: ignore[arg-type]
    assert not any(p.is_observed for p in model.hook_points())


POS_SLICES = [None, 1, -1, (1, 4), (0, 5, 2), slice(2, None), [0, 3], torch.tensor([4, 0])]


@pytest.mark.parametrize("pos_slice", POS_SLICES, ids=lambda s: repr(s).replace(" ", ""))
@pytest.mark.parametrize("remove_batch_dim", [False, True])
def test_run_with_cache_matches_transformer_lens(
    tl: Any, pos_slice: Any, remove_batch_dim: bool
) -> None:
    # hook_rot_q is left out: TL slices its head axis (see test_pos_slice_takes_rot_q_positions).
    names = lambda name: "rot_q" not in name  # noqa: E731
    kwargs = dict(
        names_filter=names, pos_slice=pos_slice, remove_batch_dim=remove_batch_dim, incl_bwd=True
    )
    ours = make_toy()
    theirs = make_toy(tl.HookPoint, tl.HookedRootModule)
    x = toy_input()
    out, cache = ours.run_with_cache(x, return_cache_object=False, **kwargs)
    tl_out, tl_cache = theirs.run_with_cache(x, **kwargs)
    assert type(cache) is dict
    torch.testing.assert_close(out, tl_out)
    expected = {f"{n}{g}" for n in ours.hook_dict if names(n) for g in ("", "_grad")}
    assert set(cache) == set(tl_cache) == expected
    for name, act in cache.items():
        torch.testing.assert_close(act, tl_cache[name], msg=name)


def test_pos_slice_takes_rot_q_positions() -> None:
    """TL slices hook_rot_q/hook_rot_k on -2 (their head axis); kvlens on positions, as hook_q."""
    model = make_toy()
    _, full = model.run_with_cache(toy_input())
    _, part = model.run_with_cache(toy_input(), pos_slice=(1, 3))
    for name in ("blocks.0.attn.hook_rot_q", "blocks.0.attn.hook_q"):
        torch.testing.assert_close(part[name], full[name][:, 1:3])
    torch.testing.assert_close(
        part["blocks.0.attn.hook_pattern"], full["blocks.0.attn.hook_pattern"][:, :, 1:3]
    )


def test_run_with_cache_returns_an_activation_cache() -> None:
    model = make_toy()
    _, cache = model.run_with_cache(toy_input(batch=1), device="cpu")
    assert isinstance(cache, ActivationCache) and cache.has_batch_dim
    assert cache.model is model and cache["hook_embed"].shape == (1, 5, D)
    _, flat = model.run_with_cache(toy_input(batch=1), remove_batch_dim=True)
    assert not flat.has_batch_dim and not flat.to("cpu").has_batch_dim
    torch.testing.assert_close(flat["hook_embed"], cache["hook_embed"][0])
    dropped = cache.remove_batch_dim()
    assert dropped is cache and not cache.has_batch_dim
    torch.testing.assert_close(cache["hook_embed"], flat["hook_embed"])
    _, two = model.run_with_cache(toy_input(batch=2))
    with pytest.raises(ValueError, match="batch size 1"):
        two.remove_batch_dim()


def test_incl_bwd_needs_a_scalar_output() -> None:
    class Vector(HookedRootModule):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.hook_x = HookPoint()
            self.setup()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.hook_x(self.lin(x))

    model = Vector()
    with pytest.raises(ValueError, match=r"must be a scalar.*got \(3, 2\)"):
        model.run_with_cache(torch.ones(3, 2), incl_bwd=True)
    assert not model.hook_x.is_observed


def test_activation_cache_short_keys() -> None:
    model = nn.Module()
    model.cfg = type("Cfg", (), {"n_layers": 3})()  # type: ignore[assignment]
    acts = {n: torch.randn(1) for n in ("hook_embed", "ln_final.hook_normalized")}
    acts |= {f"blocks.{i}.attn.hook_pattern": torch.randn(1) for i in range(3)}
    cache = ActivationCache(acts, model)
    assert cache["embed"] is acts["hook_embed"]
    assert cache["normalized"] is acts["ln_final.hook_normalized"]
    assert cache["pattern", 1] is cache["pattern", -2] is acts["blocks.1.attn.hook_pattern"]
    with pytest.raises(KeyError, match="did you mean"):
        cache["blocks.1.attn.hook_patern"]
    with pytest.raises(KeyError, match="needs the cache's model"):
        ActivationCache(acts)["pattern", -1]
