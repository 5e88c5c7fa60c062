"""A forward pass over a cache is all or nothing: a call that raises leaves the cache as it was.

On 1882f84 a hook raising at layer 3 left the layers at lengths [9, 9, 9, 8, ...], and a retry
silently gave other logits; rejected input (an id out of range, a prompt past n_ctx, a cache of
another dtype or head count) still extended the mask; uint8/int16 ids were refused with a false
message; another model's cache of the same shapes was accepted; ``cache.tokens`` went stale.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from tests.helpers import model_pair, tokens_for

from kvlens.cache import KeyValueCache, KeyValueCacheEntry
from kvlens.model import HookedTransformer


def snapshot(cache: KeyValueCache) -> dict:
    """Everything a later pass reads: lengths, keys, values, mask, tokens, fingerprint."""
    return {
        "lengths": [entry.length for entry in cache],
        "keys": [entry.past_keys.detach().clone() for entry in cache],
        "values": [entry.past_values.detach().clone() for entry in cache],
        "mask": cache.previous_attention_mask.clone(),
        "tokens": None if cache.tokens is None else cache.tokens.clone(),
        "fingerprint": cache.weights_fingerprint,
    }


def assert_same(got: dict, want: dict) -> None:
    assert got["lengths"] == want["lengths"]
    for name in ("keys", "values"):
        for a, b in zip(got[name], want[name], strict=True):
            assert torch.equal(a, b), name
    assert torch.equal(got["mask"], want["mask"])
    assert (got["tokens"] is None) == (want["tokens"] is None)
    if want["tokens"] is not None:
        assert torch.equal(got["tokens"], want["tokens"])
    assert got["fingerprint"] == want["fingerprint"]


@pytest.fixture(params=["gpt2", "llama"])
def model(request: pytest.FixtureRequest) -> HookedTransformer:
    return model_pair(request.param)[1]


def prefilled(model: HookedTransformer, tokens: torch.Tensor) -> KeyValueCache:
    with torch.no_grad():
        return model.prefill(tokens)


def raising_at(layer: int, error: BaseException):
    def hook(x: torch.Tensor, hook: object) -> None:
        raise error

    return (f"blocks.{layer}.hook_resid_post", hook)


def raising_on_call(n: int, error: BaseException):
    """A hook that raises ``error`` the ``n``-th time it runs (a pass ``n - 1`` steps in)."""
    calls = {"n": 0}

    def hook(x: torch.Tensor, hook: object) -> None:
        calls["n"] += 1
        if calls["n"] == n:
            raise error

    return hook


@torch.no_grad()
@pytest.mark.parametrize("n_new", [1, 3])  # a decode step (fused native layers) and a chunk
def test_a_hook_raising_at_any_layer_leaves_the_cache_as_it_was(model, n_new) -> None:
    tokens = tokens_for(1, 2, 6 + n_new)
    for layer in range(model.cfg.n_layers):
        cache = prefilled(model, tokens[:, :6])
        before = snapshot(cache)
        with (
            pytest.raises(RuntimeError, match="boom"),
            model.hooks([raising_at(layer, RuntimeError("boom"))]),
        ):
            model(tokens[:, 6:], past_kv_cache=cache)
        assert_same(snapshot(cache), before)
        retry = model(tokens[:, 6:], past_kv_cache=cache)
        clean = model(tokens[:, 6:], past_kv_cache=prefilled(model, tokens[:, :6]))
        assert torch.equal(retry, clean)


@torch.no_grad()
def test_a_wrong_shaped_hook_return_leaves_the_cache_as_it_was(model) -> None:
    tokens = tokens_for(2, 1, 8)
    cache = prefilled(model, tokens[:, :5])
    before = snapshot(cache)
    bad = ("blocks.1.attn.hook_v", lambda v, hook: v[:, :1])
    with pytest.raises(ValueError, match="returned shape"), model.hooks([bad]):
        model(tokens[:, 5:], past_kv_cache=cache)
    assert_same(snapshot(cache), before)


@torch.no_grad()
def test_an_interrupt_during_generate_leaves_the_cache_as_it_was() -> None:
    model = model_pair("llama")[1]
    prompt = tokens_for(3, 1, 5)
    cache = prefilled(model, prompt)
    before = snapshot(cache)
    interrupt_on_third_pass = raising_on_call(3, KeyboardInterrupt())
    new = tokens_for(4, 1, 2)
    with (
        pytest.raises(KeyboardInterrupt),
        model.hooks([("blocks.1.hook_resid_post", interrupt_on_third_pass)]),
    ):
        model.generate(
            new,
            max_new_tokens=6,
            do_sample=False,
            past_kv_cache=cache,
            verbose=False,
            stop_at_eos=False,
        )
    assert_same(snapshot(cache), before)
    retry = model.generate(
        new,
        max_new_tokens=6,
        do_sample=False,
        past_kv_cache=cache,
        verbose=False,
        stop_at_eos=False,
    )
    clean = model.generate(
        new,
        max_new_tokens=6,
        do_sample=False,
        past_kv_cache=prefilled(model, prompt),
        verbose=False,
        stop_at_eos=False,
    )
    assert torch.equal(retry, clean)


@torch.no_grad()
def test_a_stream_that_fails_midway_goes_back_and_a_closed_one_keeps_its_steps() -> None:
    model = model_pair("llama")[1]
    prompt = tokens_for(5, 1, 4)
    cache = prefilled(model, prompt)
    before = snapshot(cache)
    fail_on_third = raising_on_call(3, RuntimeError("stop"))
    with model.hooks([("blocks.0.hook_resid_post", fail_on_third)]):
        stream = model.generate_stream(
            prompt[:, -1:],
            max_new_tokens=5,
            do_sample=False,
            past_kv_cache=cache,
            stop_at_eos=False,
        )
        with pytest.raises(RuntimeError, match="stop"):
            list(stream)
    assert_same(snapshot(cache), before)
    stream = model.generate_stream(
        prompt[:, -1:], max_new_tokens=5, do_sample=False, past_kv_cache=cache, stop_at_eos=False
    )
    first, second = next(stream), next(stream)
    stream.close()
    # Fed so far: the prompt's last token again and the first new token (the second is not fed).
    assert cache.seq_len == 6 and cache.tokens is not None
    assert cache.tokens[0, -2:].tolist() == [int(prompt[0, -1]), int(first[0])]
    assert int(second[0]) >= 0


def bad_inputs(model: HookedTransformer, cache: KeyValueCache) -> list:
    """(id, call, error, words in the message): each must raise and write nothing."""
    cfg = model.cfg

    def run(tokens: list, **kw: object) -> object:
        return model(torch.tensor(tokens), past_kv_cache=cache, **kw)

    def run_on(other: KeyValueCache) -> object:
        return model(torch.tensor([[1]]), past_kv_cache=other)

    float64 = KeyValueCache.init_cache(dataclasses.replace(cfg, dtype=torch.float64), None, 1)
    one_head = KeyValueCache.init_cache(dataclasses.replace(cfg, n_key_value_heads=1), None, 1)
    past_n_ctx = [[0] * cfg.n_ctx]
    wide_mask = torch.ones(1, 3, dtype=torch.long)
    return [
        ("id out of range", lambda: run([[1, cfg.d_vocab]]), ValueError, "d_vocab"),
        ("negative id", lambda: run([[-1, 2]]), ValueError, "d_vocab"),
        ("past n_ctx", lambda: run(past_n_ctx), ValueError, "n_ctx"),
        ("mask shape", lambda: run([[1, 2]], attention_mask=wide_mask), ValueError, "mask"),
        ("float64 cache", lambda: run_on(float64), TypeError, "float64"),
        ("other head count", lambda: run_on(one_head), ValueError, "key/value heads"),
        ("batch", lambda: run([[1], [2]]), ValueError, "batch size"),
    ]


@torch.no_grad()
def test_bad_input_writes_nothing(model) -> None:
    tokens = tokens_for(6, 1, 7)
    cache = prefilled(model, tokens[:, :5])
    before = snapshot(cache)
    for name, call, error, words in bad_inputs(model, cache):
        with pytest.raises(error, match=words):
            call()
        assert_same(snapshot(cache), before), name
    assert torch.equal(
        model(tokens[:, 5:], past_kv_cache=cache),
        model(tokens[:, 5:], past_kv_cache=prefilled(model, tokens[:, :5])),
    )


@torch.no_grad()
def test_unevenly_extended_layers_are_refused_before_any_write(model) -> None:
    tokens = tokens_for(7, 1, 6)
    cache = prefilled(model, tokens[:, :5])
    cache[1].crop(4)  # as a failed pass on 1882f84 left it
    before = snapshot(cache)
    with pytest.raises(ValueError, match="extended unevenly"):
        model(tokens[:, 5:], past_kv_cache=cache)
    assert_same(snapshot(cache), before)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_token_ids_of_any_integer_dtype(model, dtype) -> None:
    ids = torch.tensor([[1, 2, 3]])
    want = model(ids)
    torch.testing.assert_close(model(ids.to(dtype)), want, rtol=0, atol=0)
    cache = KeyValueCache.init_cache(model.cfg, None, 1)
    torch.testing.assert_close(
        model(ids.to(dtype), past_kv_cache=cache), want, rtol=1e-6, atol=1e-6
    )
    assert cache.tokens is not None and cache.tokens.dtype == torch.long


@torch.no_grad()
def test_an_out_of_range_id_in_a_narrow_dtype_gets_a_true_message() -> None:
    model = model_pair("llama")[1]  # d_vocab 97
    with pytest.raises(ValueError, match=r"ids in \[1, 200\], expected ids in \[0, d_vocab=97\)"):
        model(torch.tensor([[1, 200]], dtype=torch.uint8))


@torch.no_grad()
def test_another_models_cache_is_refused_and_a_copy_is_accepted() -> None:
    model = copy.deepcopy(model_pair("llama")[1])  # its weights are replaced below
    other = HookedTransformer(model.cfg)  # same shapes, other weights
    tokens = tokens_for(8, 1, 6)
    cache = prefilled(model, tokens[:, :5])
    before = snapshot(cache)
    with pytest.raises(ValueError, match="filled by another model"):
        other(tokens[:, 5:], past_kv_cache=cache)
    assert_same(snapshot(cache), before)
    twin = copy.deepcopy(model)
    assert torch.equal(
        twin(tokens[:, 5:], past_kv_cache=cache.clone()), model(tokens[:, 5:], past_kv_cache=cache)
    )
    model.load_state_dict(other.state_dict())  # now it is the other model
    with pytest.raises(ValueError, match="filled by another model"):
        model(tokens[:, 5:], past_kv_cache=prefilled(twin, tokens[:, :5]))


@torch.no_grad()
def test_cache_tokens_stay_true() -> None:
    model = model_pair("llama")[1]
    tokens = tokens_for(9, 2, 9)

    def held(cache: KeyValueCache) -> torch.Tensor:
        assert cache.tokens is not None and cache.tokens.shape[1] == cache.seq_len
        return cache.tokens

    cache = KeyValueCache.init_cache(model.cfg, None, 2)
    model(tokens[:, :4], past_kv_cache=cache)
    assert torch.equal(held(cache), tokens[:, :4])
    model(tokens[:, 4:6], past_kv_cache=cache)
    assert torch.equal(held(cache), tokens[:, :6])
    out = model.generate(tokens[:, 6:7], max_new_tokens=3, do_sample=False, past_kv_cache=cache,
                         verbose=False, stop_at_eos=False)  # fmt: skip
    # generate feeds the prompt and every new token but the last.
    assert torch.equal(held(cache), torch.cat((tokens[:, :6], out[:, :-1]), dim=1))
    cache.crop(5)
    assert torch.equal(held(cache), tokens[:, :5])
    cache.select([1])
    assert torch.equal(held(cache), tokens[1:, :5])
    frozen = cache.clone().freeze()
    model(tokens[1:, 5:7], past_kv_cache=frozen)
    assert torch.equal(held(frozen), tokens[1:, :5])
    residual = torch.zeros(1, 1, model.cfg.d_model)
    model(residual, past_kv_cache=cache, start_at_layer=0)
    assert cache.tokens is None  # not known: dropped rather than stale


def test_entries_built_by_hand_are_still_accepted() -> None:
    """TransformerLens's contract: a cache of plain entries, no fingerprint, no token record."""
    model = model_pair("llama")[1]
    kv = torch.zeros(1, 0, model.cfg.n_kv_heads, model.cfg.d_head)
    cache = KeyValueCache([KeyValueCacheEntry(kv, kv) for _ in range(model.cfg.n_layers)])
    with torch.no_grad():
        model(torch.tensor([[1, 2]]), past_kv_cache=cache)
    assert cache.seq_len == 2 and cache.weights_fingerprint == model.weights_fingerprint()


@torch.no_grad()
def test_a_saved_cache_keeps_its_fingerprint_and_another_model_cannot_load_it(tmp_path) -> None:
    model = model_pair("llama")[1]
    other = HookedTransformer(model.cfg)
    cache = prefilled(model, tokens_for(10, 1, 5))
    cache.save(tmp_path / "c.kv")
    loaded = KeyValueCache.load(tmp_path / "c.kv", model)
    assert loaded.weights_fingerprint == model.weights_fingerprint()
    with pytest.raises(ValueError, match="filled by another model"):
        KeyValueCache.load(tmp_path / "c.kv", other)
    by_config = KeyValueCache.load(tmp_path / "c.kv", model.cfg)  # architecture only
    with pytest.raises(ValueError, match="filled by another model"):
        other(torch.tensor([[1]]), past_kv_cache=by_config)
