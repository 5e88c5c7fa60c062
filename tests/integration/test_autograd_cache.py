"""Autograd through the key-value cache equals autograd without it.

On 1882f84 the two-call case raised "modified by an inplace operation" and a second suffix on a
frozen prefix raised "Trying to backward through the graph a second time". Models run in float64
so that the comparisons can be tight (1e-5 relative to the largest gradient, far tighter in fact).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tests.helpers import model_pair, tokens_for

from kvlens.cache import KeyValueCache
from kvlens.model import HookedTransformer

FAMILIES_UNDER_TEST = ("gpt2", "pythia", "llama")  # learned positions, parallel + rotary, GQA


def float64_model(family: str) -> HookedTransformer:
    src = model_pair(family)[1]
    model = HookedTransformer(dataclasses.replace(src.cfg, dtype=torch.float64), init_weights=False)
    model.load_state_dict(src.state_dict())
    return model


def grads(model: HookedTransformer) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_grads_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    scale = max(float(g.abs().max()) for g in want.values())
    for name in want:
        err = float((got[name] - want[name]).abs().max())
        assert err <= 1e-5 * scale, f"{name}: max error {err} (largest gradient {scale})"


@pytest.fixture(params=FAMILIES_UNDER_TEST)
def model(request: pytest.FixtureRequest) -> HookedTransformer:
    return float64_model(request.param)


def test_gradients_through_several_cached_calls_equal_uncached(model: HookedTransformer) -> None:
    tokens = tokens_for(1, 2, 12)
    splits = [(0, 5), (5, 7), (7, 8), (8, 9), (9, 12)]  # a prefill, a chunk, decode steps

    def loss_of(logits: torch.Tensor, start: int) -> torch.Tensor:
        weights = torch.arange(1, logits.shape[1] + 1, dtype=logits.dtype) + start
        return (logits.log_softmax(-1)[..., 3] * weights[None, :]).sum()

    full = model(tokens)
    sum(loss_of(full[:, a:b], a) for a, b in splits).backward()
    want = grads(model)

    cache = model.prefill(tokens[:, :5])  # under grad: keeps its graph
    assert cache[0].past_keys.requires_grad
    total = torch.zeros((), dtype=torch.float64)
    for a, b in splits[1:]:
        total = total + loss_of(model(tokens[:, a:b], past_kv_cache=cache), a)
    # The prefill's own logits are not part of this run; add them through a plain forward pass.
    total = total + loss_of(model(tokens[:, :5]), 0)
    total.backward()
    assert_grads_close(grads(model), want)


def test_the_issue_example_two_calls_then_one_backward(model: HookedTransformer) -> None:
    tokens = tokens_for(2, 1, 9)
    cache = model.prefill(tokens[:, :5])
    a = model(tokens[:, 5:7], past_kv_cache=cache)
    b = model(tokens[:, 7:], past_kv_cache=cache)
    (a.sum() + b.sum()).backward()
    got = grads(model)
    full = model(tokens)
    full[:, 5:].sum().backward()
    assert_grads_close(got, grads(model))


def test_frozen_prefix_without_grad_backpropagates_any_number_of_times(
    model: HookedTransformer,
) -> None:
    prefix = tokens_for(3, 2, 6)
    with torch.no_grad():
        frozen = model.prefill(prefix).freeze()
    assert not frozen[0].past_keys.requires_grad
    for seed in (4, 5, 6):
        suffix = tokens_for(seed, 2, 1 + seed % 3)
        model(suffix, past_kv_cache=frozen).log_softmax(-1)[..., 7].sum().backward()
        got = grads(model)
        with torch.no_grad():
            fresh = model.prefill(prefix)
        model(suffix, past_kv_cache=fresh).log_softmax(-1)[..., 7].sum().backward()
        assert_grads_close(got, grads(model))
        assert frozen.seq_len == 6


def test_frozen_prefix_with_grad_behaves_as_any_graph(model: HookedTransformer) -> None:
    prefix, suffix = tokens_for(7, 1, 6), tokens_for(8, 1, 3)
    frozen = model.prefill(prefix).freeze()
    model(suffix, past_kv_cache=frozen).sum().backward(retain_graph=True)
    got = grads(model)
    model(torch.cat((prefix, suffix), dim=1))[:, 6:].sum().backward()
    assert_grads_close(got, grads(model))  # the gradient reaches the prefix's computation
    # retain_graph kept it: a second continuation can backpropagate, and a third cannot.
    model(suffix[:, :1], past_kv_cache=frozen).sum().backward()
    model.zero_grad()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        model(suffix[:, :2], past_kv_cache=frozen).sum().backward()


def test_prefill_follows_grad_mode(model: HookedTransformer) -> None:
    tokens = tokens_for(9, 1, 4)
    assert model.prefill(tokens)[0].past_keys.grad_fn is not None
    with torch.no_grad():
        plain = model.prefill(tokens)
    assert plain[0].past_keys.grad_fn is None
    with torch.inference_mode():
        inference = model.prefill(tokens)
    assert not inference[0].past_keys.requires_grad


def test_steering_vector_optimised_through_decode_steps(model: HookedTransformer) -> None:
    torch.manual_seed(0)
    steer = torch.zeros(model.cfg.d_model, dtype=torch.float64, requires_grad=True)
    prompt = tokens_for(10, 1, 5)
    target = 11

    def add(resid: torch.Tensor, hook: object) -> torch.Tensor:
        return resid + steer

    def cached_loss() -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy decode of 4 tokens through the cache; loss: -log p(target) at every step."""
        cache = KeyValueCache.init_cache(model.cfg, None, batch_size=1)
        logits = model(prompt, past_kv_cache=cache)[:, -1]
        loss, seq = -logits.log_softmax(-1)[:, target].sum(), prompt
        for _ in range(3):
            nxt = logits.argmax(-1, keepdim=True)
            seq = torch.cat((seq, nxt), dim=1)
            logits = model(nxt, past_kv_cache=cache)[:, -1]
            loss = loss - logits.log_softmax(-1)[:, target].sum()
        return loss, seq

    with model.hooks([("blocks.0.hook_resid_post", add)]):
        loss, seq = cached_loss()
        (g_cached,) = torch.autograd.grad(loss, steer)
        full = model(seq)[:, prompt.shape[1] - 1 :]
        (g_full,) = torch.autograd.grad(-full.log_softmax(-1)[..., target].sum(), steer)
    torch.testing.assert_close(g_cached, g_full, rtol=1e-7, atol=1e-9)
    assert float(g_full.abs().max()) > 0

    optimiser = torch.optim.SGD([steer], lr=0.05)
    with model.hooks([("blocks.0.hook_resid_post", add)]):
        before, _ = cached_loss()
        for _ in range(5):
            optimiser.zero_grad()
            cached_loss()[0].backward()
            optimiser.step()
        after, _ = cached_loss()
    assert float(after.detach()) < float(before.detach())


def test_soft_prompt_gradient_through_the_cache(model: HookedTransformer) -> None:
    soft = torch.randn(1, 3, model.cfg.d_model, dtype=torch.float64) * 0.1
    soft.requires_grad_(True)
    tokens = tokens_for(12, 1, 8)

    def replace_first_three(embed: torch.Tensor, hook: object) -> torch.Tensor:
        if embed.shape[1] == tokens.shape[1] or hook_state["prefill"]:
            return torch.cat((soft, embed[:, 3:]), dim=1)
        return embed

    hook_state = {"prefill": False}
    with model.hooks([("hook_embed", replace_first_three)]):
        full = model(tokens)
        (want,) = torch.autograd.grad(full[:, 5:].sum(), soft)
        cache = KeyValueCache.init_cache(model.cfg, None, batch_size=1)
        hook_state["prefill"] = True
        model(tokens[:, :5], past_kv_cache=cache)
        hook_state["prefill"] = False
        parts = [model(tokens[:, i : i + 1], past_kv_cache=cache) for i in range(5, 8)]
        (got,) = torch.autograd.grad(torch.cat(parts, dim=1).sum(), soft)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)


def test_crop_select_and_clone_keep_the_graph(model: HookedTransformer) -> None:
    tokens = tokens_for(13, 3, 8)
    cache = model.prefill(tokens[:, :6])
    cache.crop(4)
    assert cache[0].past_keys.shape[1] == 4
    fork = cache.clone()
    cache.select([2, 0])
    out = model(tokens[[2, 0], 4:6], past_kv_cache=cache)
    out_fork = model(tokens[:, 4:5], past_kv_cache=fork)
    (out.sum() + out_fork.sum()).backward()
    got = grads(model)
    (model(tokens[[2, 0], :6])[:, 4:6].sum() + model(tokens[:, :5])[:, 4:5].sum()).backward()
    assert_grads_close(got, grads(model))


def test_a_pass_without_grad_drops_the_graph_and_stays_consistent(model: HookedTransformer) -> None:
    tokens = tokens_for(14, 1, 7)
    cache = model.prefill(tokens[:, :4])
    assert cache[0].tracks_graph
    with torch.no_grad():
        model(tokens[:, 4:5], past_kv_cache=cache)  # may take the fused native decode layer
    assert all(not entry.tracks_graph for entry in cache)
    assert [entry.past_keys.shape[1] for entry in cache] == [5] * model.cfg.n_layers
    # Later tracked passes read the stored values: gradients stop at them, values are right.
    out = model(tokens[:, 5:], past_kv_cache=cache)
    with torch.no_grad():
        want = model(tokens)[:, 5:]
    torch.testing.assert_close(out.detach(), want, rtol=1e-9, atol=1e-9)
    out.sum().backward()


def test_no_grad_decode_keeps_writing_in_place() -> None:
    model = model_pair("llama")[1]
    tokens = tokens_for(15, 1, 6)
    with torch.no_grad():
        cache = model.prefill(tokens[:, :5], capacity=8)
        storage = cache[0].past_keys.untyped_storage().data_ptr()
        model(tokens[:, 5:], past_kv_cache=cache)
    assert not cache[0].tracks_graph
    assert cache[0].past_keys.untyped_storage().data_ptr() == storage


def test_a_cache_holding_a_graph_saves_and_loads(tmp_path) -> None:
    model = model_pair("llama")[1]
    tokens = tokens_for(16, 1, 5)
    cache = model.prefill(tokens)
    assert cache[0].tracks_graph
    cache.save(tmp_path / "graph.kv")
    loaded = KeyValueCache.load(tmp_path / "graph.kv", model)
    torch.testing.assert_close(loaded[0].past_keys, cache[0].past_keys.detach())
