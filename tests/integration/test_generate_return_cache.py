"""Activations of a whole generation (``generate(return_cache=True)``), each step's logits
(``output_logits``) and embeddings as input and output (``return_type="embeds"``)."""

from __future__ import annotations

import pytest
import torch
from tests.helpers import model_pair, padding_mask, tokens_for

import kvlens.components.decode_plan as plan_module
from kvlens import KeyValueCache
from kvlens.generate import GenerateOutput
from kvlens.kernels import build

GREEDY = dict(do_sample=False, stop_at_eos=False, verbose=False)
FAMILIES = ["gpt2", "pythia", "llama", "mistral", "gemma2"]


def real_positions(mask: torch.Tensor, name: str, act: torch.Tensor) -> torch.Tensor:
    """Where ``act`` (of hook point ``name``) belongs to real tokens only."""
    real = mask.bool()
    if name.endswith(("hook_pattern", "hook_attn_scores")):
        return (real[:, None, :, None] & real[:, None, None, :]).expand_as(act)
    return real.view(*real.shape, *([1] * (act.ndim - 2))).expand_as(act)


def assert_caches_equal(got, want, mask: torch.Tensor | None = None, scaled: bool = False) -> None:
    """Equal names, shapes, masked places and values to 1e-4 (``scaled``: 1e-4 of the largest
    magnitude of each activation, for a real model's residual stream, whose attention-sink
    positions reach 1e4)."""
    assert sorted(got.keys()) == sorted(want.keys())
    for name in list(want.keys()):
        a, b = got[name], want[name]
        assert a.shape == b.shape, name
        if mask is not None:
            keep = real_positions(mask, name, a)
            a, b = a[keep], b[keep]
        # -inf (masked scores) must sit at the same places
        assert torch.equal(torch.isinf(a), torch.isinf(b)), name
        finite = ~torch.isinf(b)
        a, b = a[finite], b[finite]
        tolerance = 1e-4 * max(1.0, float(b.abs().max())) if scaled else 1e-4
        assert float((a - b).abs().max()) <= tolerance, name


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cached", [True, False])
def test_return_cache_equals_run_with_cache_on_the_result(family: str, cached: bool) -> None:
    _, model = model_pair(family)
    tokens, mask = tokens_for(0, 3, 7), padding_mask(3, 7, "left")
    out, cache = model.generate(
        tokens, max_new_tokens=5, attention_mask=mask, use_past_kv_cache=cached, return_cache=True,
        **GREEDY,
    )  # fmt: skip
    assert torch.equal(out, model.generate(tokens, max_new_tokens=5, attention_mask=mask, **GREEDY))
    full_mask = torch.cat([mask, torch.ones(3, 5, dtype=torch.long)], dim=1)
    _, want = model.run_with_cache(out, attention_mask=full_mask)
    assert cache["blocks.0.attn.hook_pattern"].shape == (3, model.cfg.n_heads, 12, 12)
    assert cache["blocks.1.hook_resid_post"].shape == (3, 12, model.cfg.d_model)
    assert_caches_equal(cache, want)  # padding positions included: left padding runs in place


def test_rows_after_their_eos_hold_what_their_forward_pass_would() -> None:
    _, model = model_pair("llama")
    tokens, mask = tokens_for(1, 2, 6), padding_mask(2, 6, "left")
    plain = model.generate(tokens, max_new_tokens=6, attention_mask=mask, **GREEDY)
    eos = int(plain[0, 7])  # row 0 stops at its second new token
    out, cache = model.generate(
        tokens, max_new_tokens=6, attention_mask=mask, eos_token_id=eos, return_cache=True,
        do_sample=False, verbose=False,
    )  # fmt: skip
    assert out.shape[1] > 8 and int(out[0, 8]) != int(plain[0, 8])  # padded after its EOS
    full_mask = torch.cat([mask, torch.ones_like(out[:, 6:])], dim=1)
    _, want = model.run_with_cache(out, attention_mask=full_mask)
    assert_caches_equal(cache, want)


def test_right_padding_is_put_back_in_the_prompts_order() -> None:
    _, model = model_pair("gpt2")
    tokens, mask = tokens_for(2, 3, 7), padding_mask(3, 7, "right")
    out, cache = model.generate(
        tokens, max_new_tokens=4, attention_mask=mask, return_cache=True, **GREEDY
    )
    full_mask = torch.cat([mask, torch.ones(3, 4, dtype=torch.long)], dim=1)
    _, want = model.run_with_cache(out, attention_mask=full_mask)
    # Real tokens' activations equal; padding ran at the front of its row, so its own differ.
    assert_caches_equal(cache, want, full_mask)


def test_only_the_filtered_names_on_the_chosen_device() -> None:
    _, model = model_pair("llama")
    tokens = tokens_for(3, 2, 5)
    names = ["blocks.1.hook_resid_post", "blocks.0.attn.hook_attn_scores", "ln_final.hook_scale"]
    out, cache = model.generate(
        tokens, max_new_tokens=3, return_cache=True, names_filter=names, cache_device="meta",
        **GREEDY,
    )  # fmt: skip
    assert sorted(cache.keys()) == sorted(names)
    assert all(cache[name].device.type == "meta" for name in names)
    assert cache["ln_final.hook_scale"].shape[:2] == (2, 8)  # every position, not the last
    _, on_cpu = model.generate(tokens, max_new_tokens=3, return_cache=True, names_filter=names,
                               **GREEDY)  # fmt: skip
    _, want = model.run_with_cache(out, names_filter=names)
    assert_caches_equal(on_cpu, want)


@pytest.mark.skipif(not build.available(), reason="native kernels not built here")
def test_recording_the_residual_stream_keeps_the_native_layer(monkeypatch) -> None:
    _, model = model_pair("llama")
    calls: list[bool] = []
    layer = plan_module.decode_layer

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = layer(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(plan_module, "decode_layer", counted)
    tokens = tokens_for(4, 2, 6)
    names = lambda name: name.endswith(("hook_resid_pre", "hook_resid_post"))  # noqa: E731
    out, cache = model.generate(
        tokens, max_new_tokens=5, return_cache=True, names_filter=names, **GREEDY
    )
    assert calls and all(calls) and len(calls) == 5 * model.cfg.n_layers  # 4 steps + the last
    _, want = model.run_with_cache(out, names_filter=names)
    assert_caches_equal(cache, want)


def test_after_a_past_cache_positions_continue_it() -> None:
    _, model = model_pair("pythia")
    first, second = tokens_for(5, 2, 4), tokens_for(6, 2, 3)
    past = KeyValueCache.init_cache(model.cfg, None, 2)
    with torch.no_grad():
        model(first, past_kv_cache=past, attention_mask=torch.ones_like(first))
    out, cache = model.generate(
        second, max_new_tokens=3, past_kv_cache=past, return_cache=True, **GREEDY
    )
    _, whole = model.run_with_cache(torch.cat([first, out], dim=1))
    for name in ("blocks.0.hook_resid_post", "blocks.1.attn.hook_pattern"):
        want = whole[name][:, 4:] if "resid" in name else whole[name][:, :, 4:]
        assert cache[name].shape == want.shape
        assert torch.allclose(cache[name], want, atol=1e-4)


def test_bad_requests_are_refused_before_any_work() -> None:
    _, model = model_pair("llama")
    tokens = tokens_for(7, 1, 4)
    past = KeyValueCache.init_cache(model.cfg, None, 1)
    with pytest.raises(ValueError, match="unknown hook point"):
        model.generate(tokens, return_cache=True, names_filter="blocks.0.hook_nope",
                       past_kv_cache=past, **GREEDY)  # fmt: skip
    assert past.seq_len == 0
    with pytest.raises(ValueError, match="return_cache=True"):
        model.generate(tokens, names_filter="blocks.0.hook_resid_post", **GREEDY)
    with pytest.raises(ValueError, match="beam search"):
        model.generate(tokens, return_cache=True, num_beams=2, **GREEDY)
    with pytest.raises(ValueError, match="output_logits"):
        model.generate(tokens, output_logits=True, num_beams=2, **GREEDY)
    assert not any(point.attached for point in model.hook_points())


@pytest.mark.parametrize("cached", [True, False])
def test_output_logits_are_each_steps_logits(cached: bool) -> None:
    _, model = model_pair("gpt2")
    tokens, mask = tokens_for(8, 3, 6), padding_mask(3, 6, "left")
    got = model.generate(
        tokens, max_new_tokens=4, attention_mask=mask, output_logits=True,
        use_past_kv_cache=cached, **GREEDY,
    )  # fmt: skip
    assert isinstance(got, GenerateOutput)
    plain = model.generate(tokens, max_new_tokens=4, attention_mask=mask, **GREEDY)
    assert torch.equal(got.sequences, plain)
    assert len(got.logits) == 4
    full_mask = torch.cat([mask, torch.ones(3, 4, dtype=torch.long)], dim=1)
    with torch.no_grad():
        logits = model(plain, attention_mask=full_mask)
    for k, step in enumerate(got.logits):
        assert step.shape == (3, model.cfg.d_vocab)
        assert torch.allclose(step, logits[:, 5 + k], atol=1e-4)
        assert torch.equal(step.argmax(-1), plain[:, 6 + k])


def test_sampled_logits_are_before_temperature() -> None:
    _, model = model_pair("llama")
    tokens = tokens_for(9, 2, 5)
    got = model.generate(tokens, max_new_tokens=3, output_logits=True, do_sample=True,
                         temperature=0.5, seed=0, stop_at_eos=False, verbose=False)  # fmt: skip
    with torch.no_grad():
        logits = model(got.sequences)
    for k, step in enumerate(got.logits):
        assert torch.allclose(step, logits[:, 4 + k], atol=1e-4)
    # both outputs at once
    out, cache = model.generate(tokens, max_new_tokens=3, output_logits=True, return_cache=True,
                                names_filter="blocks.0.hook_resid_post", **GREEDY)  # fmt: skip
    assert isinstance(out, GenerateOutput) and cache["blocks.0.hook_resid_post"].shape[1] == 8


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("cached", [True, False])
def test_embeddings_in_and_out(family: str, cached: bool) -> None:
    _, model = model_pair(family)
    tokens, mask = tokens_for(10, 3, 6), padding_mask(3, 6, "left")
    plain = model.generate(tokens, max_new_tokens=4, attention_mask=mask, **GREEDY)
    with torch.no_grad():
        embeds = model.embed(tokens)
    options = dict(max_new_tokens=4, attention_mask=mask, use_past_kv_cache=cached, **GREEDY)
    out = model.generate(embeds, **options)  # return_type "input": embeddings
    with torch.no_grad():
        assert torch.equal(out, model.embed(plain))
    assert torch.equal(model.generate(embeds, return_type="tokens", **options), plain[:, 6:])
    assert torch.equal(model.generate(tokens, return_type="embeds", **options), out)


def test_embeddings_are_what_the_model_runs() -> None:
    """A hook on ``hook_embed`` sees the given embeddings; changing them changes the tokens."""
    _, model = model_pair("llama")
    tokens = tokens_for(11, 1, 5)
    with torch.no_grad():
        embeds = model.embed(tokens)
    seen = []
    with model.hooks(fwd_hooks=[("hook_embed", lambda x, hook: seen.append(x.clone()))]):
        model.generate(embeds, max_new_tokens=2, **GREEDY)
    assert torch.equal(seen[0], embeds) and seen[1].shape == (1, 1, model.cfg.d_model)
    other = model.generate(embeds * 3.0, max_new_tokens=6, return_type="tokens", **GREEDY)
    assert not torch.equal(other, model.generate(embeds, max_new_tokens=6, return_type="tokens",
                                                 **GREEDY))  # fmt: skip


def test_bad_embeddings_are_refused() -> None:
    _, model = model_pair("llama")
    with pytest.raises(ValueError, match="d_model"):
        model.generate(torch.zeros(1, 4, model.cfg.d_model + 1), **GREEDY)
    with pytest.raises(ValueError, match="embeddings"):
        model.generate(torch.zeros(1, 4, model.cfg.d_model), num_beams=2, **GREEDY)


def test_the_default_model_return_cache_equals_run_with_cache() -> None:
    import kvlens

    model = kvlens.HookedTransformer.from_pretrained(progress=False)
    prompts = ["The capital of France is", "def add(a, b):"]
    names = [
        "hook_embed", "blocks.0.hook_resid_post", "blocks.15.hook_resid_post",
        "blocks.29.hook_resid_post", "blocks.5.attn.hook_pattern", "blocks.20.attn.hook_z",
        "ln_final.hook_normalized",
    ]  # fmt: skip
    out, cache = model.generate(
        prompts, max_new_tokens=6, return_type="tokens", return_cache=True, names_filter=names,
        **GREEDY,
    )  # fmt: skip
    _, mask = model.to_tokens_and_mask(prompts, padding_side="left")
    full_mask = torch.cat([mask, torch.ones_like(out[:, mask.shape[1] :])], dim=1)
    _, want = model.run_with_cache(out, attention_mask=full_mask, names_filter=names)
    assert cache["blocks.5.attn.hook_pattern"].shape[-2:] == (out.shape[1], out.shape[1])
    assert_caches_equal(cache, want, scaled=True)


def test_over_a_shared_prefix_each_row_equals_its_whole_sequence() -> None:
    _, model = model_pair("llama")
    prefix, suffixes = tokens_for(12, 1, 6), tokens_for(13, 2, 3)
    shared = model.prefill(prefix).freeze()
    out, cache = model.generate(
        suffixes, max_new_tokens=4, past_kv_cache=shared, return_cache=True, **GREEDY
    )
    for row in range(2):
        _, whole = model.run_with_cache(torch.cat([prefix[0], out[row]])[None])
        for name in ("blocks.0.hook_resid_post", "blocks.1.attn.hook_attn_scores"):
            want = whole[name][:, 6:] if "resid" in name else whole[name][:, :, 6:]
            got = cache[name][row : row + 1]
            assert got.shape == want.shape
            assert torch.equal(torch.isinf(got), torch.isinf(want))
            finite = ~torch.isinf(want)
            assert torch.allclose(got[finite], want[finite], atol=1e-4)


def test_a_past_cache_then_holds_the_last_token_too() -> None:
    _, model = model_pair("llama")
    tokens = tokens_for(14, 1, 4)
    plain, recorded = (KeyValueCache.init_cache(model.cfg, None, 1) for _ in range(2))
    model.generate(tokens, max_new_tokens=3, past_kv_cache=plain, **GREEDY)
    out, _ = model.generate(
        tokens, max_new_tokens=3, past_kv_cache=recorded, return_cache=True, **GREEDY
    )
    assert plain.seq_len == 6 and recorded.seq_len == 7 == out.shape[1]  # every token, once
