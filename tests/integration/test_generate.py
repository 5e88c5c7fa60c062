"""generate / generate_stream: cache reuse, batching, EOS, sampling, input and output kinds."""

import pytest
import torch
from tests.tiny_models import tiny_llama_with_tokenizer

from kvlens import KeyValueCache

PROMPTS = ["The cat sat on the", "Hello", "A much longer prompt, with commas, and more words in it"]


@pytest.fixture(scope="module")
def model():
    return tiny_llama_with_tokenizer()


def greedy(model, input, **kw):
    kw.setdefault("max_new_tokens", 12)
    return model.generate(input, do_sample=False, stop_at_eos=False, verbose=False, **kw)


def test_cached_generation_equals_uncached(model):
    tokens = model.to_tokens(PROMPTS[2])
    with_cache = greedy(model, tokens, use_past_kv_cache=True)
    without = greedy(model, tokens, use_past_kv_cache=False)
    assert with_cache.shape == (1, tokens.shape[1] + 12)
    assert torch.equal(with_cache, without)


def test_output_starts_with_the_input_and_string_in_string_out(model):
    out = greedy(model, PROMPTS[0])
    assert isinstance(out, str)
    assert out.startswith(PROMPTS[0])
    assert len(out) > len(PROMPTS[0])
    tokens = model.to_tokens(PROMPTS[0])
    out_tokens = greedy(model, PROMPTS[0], return_type="tokens")
    assert torch.equal(out_tokens[:, : tokens.shape[1]], tokens)
    assert model.to_string(out_tokens[0]) == out


def test_batched_greedy_equals_each_prompt_alone(model):
    batch = greedy(model, PROMPTS, return_type="str")
    alone = [greedy(model, p) for p in PROMPTS]
    assert batch == alone


def test_each_decode_step_feeds_only_the_new_token(model):
    seen = []

    def record(x, hook):
        seen.append(x.shape[1])

    tokens = model.to_tokens(PROMPTS[0])
    with model.hooks([("hook_embed", record)]):
        greedy(model, tokens, max_new_tokens=6)
    assert seen == [tokens.shape[1]] + [1] * 5


def test_each_row_stops_at_its_own_eos(model):
    free = greedy(model, PROMPTS, return_type="tokens", max_new_tokens=8)
    n_prompt = free.shape[1] - 8
    eos = int(free[0, n_prompt + 2])  # what row 0 writes third: call it EOS
    assert eos not in free[1, n_prompt:].tolist(), "choose prompts whose rows differ"
    out = model.generate(
        PROMPTS,
        max_new_tokens=8,
        do_sample=False,
        eos_token_id=eos,
        verbose=False,
        return_type="tokens",
    )
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else eos
    new = out[:, n_prompt:]
    first = new[0].tolist().index(eos)
    assert first <= 2
    assert all(t == pad for t in new[0, first + 1 :].tolist())
    assert torch.equal(new[1], free[1, n_prompt : n_prompt + new.shape[1]])


def test_generation_stops_early_when_every_row_is_done(model):
    free = greedy(model, PROMPTS[0], return_type="tokens", max_new_tokens=5)
    eos = int(free[0, -5])  # the first new token
    out = model.generate(
        PROMPTS[0],
        max_new_tokens=5,
        do_sample=False,
        eos_token_id=eos,
        verbose=False,
        return_type="tokens",
    )
    assert out.shape[1] == free.shape[1] - 4


def test_stream_yields_the_same_tokens_as_generate(model):
    tokens = model.to_tokens(PROMPTS[1])
    streamed = list(
        model.generate_stream(tokens, max_new_tokens=7, do_sample=False, stop_at_eos=False)
    )
    assert len(streamed) == 7
    assert all(t.shape == (1,) for t in streamed)
    full = greedy(model, tokens, max_new_tokens=7)
    assert torch.equal(torch.stack(streamed, 1), full[:, tokens.shape[1] :])


def test_seeded_sampling_is_reproducible(model):
    kw = dict(max_new_tokens=10, do_sample=True, temperature=1.0, verbose=False, stop_at_eos=False)
    a = model.generate(PROMPTS[0], seed=3, **kw)
    b = model.generate(PROMPTS[0], seed=3, **kw)
    c = model.generate(PROMPTS[0], seed=4, **kw)
    assert a == b
    assert a != c
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert model.generate(PROMPTS[0], generator=g1, **kw) == model.generate(
        PROMPTS[0], generator=g2, **kw
    )


def test_generate_continues_a_given_cache(model):
    first, second = model.to_tokens("The cat"), model.to_tokens(" sat on the")
    cache = KeyValueCache.init_cache(model.cfg, None, 1)
    model(first, past_kv_cache=cache)
    out = greedy(model, second, past_kv_cache=cache, max_new_tokens=5)
    whole = greedy(model, torch.cat([first, second], 1), max_new_tokens=5)
    assert torch.equal(out[:, second.shape[1] :], whole[:, -5:])


def test_hooks_apply_during_generation(model):
    tokens = model.to_tokens(PROMPTS[2])

    def zero_v(v, hook):
        return torch.zeros_like(v)

    plain = greedy(model, tokens)
    with model.hooks([("blocks.0.attn.hook_v", zero_v), ("blocks.1.attn.hook_v", zero_v)]):
        ablated = greedy(model, tokens)
    assert not torch.equal(plain, ablated)


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.2}, "top_p"),
        ({"temperature": -1.0}, "temperature"),
        ({"max_new_tokens": 10_000}, "n_ctx"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(model, kwargs, word):
    with pytest.raises(ValueError, match=word):
        model.generate(PROMPTS[0], verbose=False, **kwargs)


def test_empty_prompt_is_refused(model):
    with pytest.raises(ValueError, match="empty"):
        model.generate("", verbose=False)
    with pytest.raises(ValueError, match="empty"):
        model.generate(["ok", ""], verbose=False)


def test_prompt_longer_than_context_is_refused():
    model = tiny_llama_with_tokenizer(n_ctx=16)
    with pytest.raises(ValueError, match="n_ctx"):
        model.generate("word " * 40, max_new_tokens=1, verbose=False)


# Padding: each row of a batch gives what it gives alone ------------------------------------------


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("use_past_kv_cache", [True, False])
def test_batched_greedy_equals_each_prompt_alone_on_either_padding_side(
    model, side, use_past_kv_cache
):
    batch = greedy(model, PROMPTS, padding_side=side, use_past_kv_cache=use_past_kv_cache)
    assert batch == [greedy(model, p) for p in PROMPTS]


def test_right_padded_tokens_keep_their_layout_and_each_row_continues_alone(model):
    tokens, mask = model.to_tokens_and_mask(PROMPTS, padding_side="right")
    assert not bool(mask[:, -1].all()), "some row must end in padding"
    out = greedy(model, tokens, attention_mask=mask, max_new_tokens=6)
    assert torch.equal(out[:, : tokens.shape[1]], tokens)
    for i, prompt in enumerate(PROMPTS):
        alone = greedy(model, model.to_tokens(prompt), max_new_tokens=6)
        assert out[i, tokens.shape[1] :].tolist() == alone[0, -6:].tolist(), i


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_token_input_without_a_mask_is_unpadded_as_a_cached_forward_would(model, side):
    # to_tokens pads with the pad token (EOS for SmolLM2); generate finds it on that side.
    tokens = model.to_tokens(PROMPTS, padding_side=side)
    out = greedy(model, tokens, padding_side=side, max_new_tokens=6)
    for i, prompt in enumerate(PROMPTS):
        alone = greedy(model, model.to_tokens(prompt), max_new_tokens=6)
        assert out[i, -6:].tolist() == alone[0, -6:].tolist(), i


def test_right_padded_suffixes_after_a_shared_prefix_equal_each_alone(model):
    prefix = model.prefill(model.to_tokens("Once upon a time,")).freeze()
    suffixes = [" the cat", " a small dog ran to the house and"]
    batch = greedy(model, suffixes, padding_side="right", past_kv_cache=prefix, max_new_tokens=6)
    for i, suffix in enumerate(suffixes):
        alone = greedy(model, suffix, past_kv_cache=prefix, max_new_tokens=6)
        assert batch[i] == alone, i


def test_a_generated_pad_token_stays_real_in_later_steps(model):
    # SmolLM2's pad token is its EOS: fed back in a decode step it must not be masked, as a
    # forward pass with a cache would guess for a trailing pad token.
    eos = model.tokenizer.eos_token_id
    prompt = model.to_tokens(PROMPTS[0])
    tokens = torch.cat([prompt, torch.tensor([[eos]])], dim=1)
    cache = KeyValueCache.init_cache(model.cfg, None, 1)
    model(prompt, past_kv_cache=cache)
    from kvlens.generate import decode_step

    stepped = decode_step(model, torch.tensor([eos]), cache)
    assert bool(cache.previous_attention_mask.all())
    full = model(tokens, attention_mask=torch.ones_like(tokens))[:, -1]
    assert torch.allclose(stepped, full, atol=1e-4)
