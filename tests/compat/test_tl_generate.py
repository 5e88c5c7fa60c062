"""Greedy ``generate``: the same tokens as TL, with and without the cache and a steering hook.

TL 2.18's cached and uncached generation agree with each other on unpadded input (checked
below); on a padded batch TL's ``generate`` attends to the padding (pinned below), so padded
batches are compared with TL run on each prompt alone.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from tests.compat.pairs import EOS, PAD, Pair, random_tokens, text_pair

GREEDY: dict[str, Any] = dict(do_sample=False, verbose=False)


def steering_hooks(seed: int = 5) -> list[tuple[str, Any]]:
    """A hook adding a fixed random vector to block 0's output at every position."""
    vector = 3.0 * torch.randn(32, generator=torch.Generator().manual_seed(seed))

    def steer(resid: torch.Tensor, hook: Any) -> torch.Tensor:
        return resid + vector

    return [("blocks.0.hook_resid_post", steer)]


PROMPT = random_tokens(4, 2, 5)
NEW_TOKENS = 10


@functools.cache
def tl_greedy(family: str, steered: bool, use_cache: bool) -> torch.Tensor:
    """TL's greedy continuation of :data:`PROMPT` (computed once per session)."""
    pair = text_pair(family)
    kw = dict(GREEDY, max_new_tokens=NEW_TOKENS, stop_at_eos=False, use_past_kv_cache=use_cache)
    with pair.tl.hooks(steering_hooks() if steered else []):
        return pair.tl.generate(PROMPT, **kw)


@pytest.mark.parametrize("steered", [False, True], ids=["plain", "steered"])
def test_tl_cached_generate_matches_uncached(tpair: Pair, steered: bool) -> None:
    """The oracle agrees with itself, so either of its paths can be the reference."""
    cached = tl_greedy(tpair.family, steered, use_cache=True)
    assert torch.equal(cached, tl_greedy(tpair.family, steered, use_cache=False))


@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "uncached"])
@pytest.mark.parametrize("steered", [False, True], ids=["plain", "steered"])
def test_greedy_tokens(tpair: Pair, use_cache: bool, steered: bool) -> None:
    kw = dict(GREEDY, max_new_tokens=NEW_TOKENS, stop_at_eos=False, use_past_kv_cache=use_cache)
    with tpair.kv.hooks(steering_hooks() if steered else []):
        kv = tpair.kv.generate(PROMPT, **kw)
    tl = tl_greedy(tpair.family, steered, use_cache=False)
    assert torch.equal(kv, tl)
    if steered:
        plain = tl_greedy(tpair.family, False, use_cache=False)
        assert not torch.equal(tl, plain), "the steering hook must change the output"


def test_greedy_from_text(tpair: Pair) -> None:
    kw = dict(GREEDY, max_new_tokens=6, stop_at_eos=False, return_type="tokens")
    prompt = "the cat sat on the"
    assert torch.equal(tpair.kv.generate(prompt, **kw), tpair.tl.generate(prompt, **kw))


@functools.cache
def eos_runs(family: str) -> tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both models' generations stopping at a token row 1 makes early and row 0 never does.

    Returns that token, the step row 1 makes it at, kvlens's and TL's output, and TL's output
    when the stop token is given in a list.
    """
    pair = text_pair(family)
    free = tl_greedy(family, False, use_cache=False)[:, PROMPT.shape[1] :]
    candidates = [
        (token, step)
        for step, token in enumerate(free[1, :-2].tolist())
        if token not in free[0].tolist()
    ]
    assert candidates, "no token ends row 1 alone; change the prompt"
    eos, step = candidates[0]
    kw = dict(GREEDY, max_new_tokens=NEW_TOKENS, eos_token_id=eos)
    kv, tl = pair.kv.generate(PROMPT, **kw), pair.tl.generate(PROMPT, **kw)
    return eos, step, kv, tl, pair.tl.generate(PROMPT, **dict(kw, eos_token_id=[eos, 0]))


def test_stop_at_eos(tpair: Pair) -> None:
    """A row that made EOS is done; generation runs on while another row is not."""
    eos, step, kv, tl, _ = eos_runs(tpair.family)
    assert kv.shape == tl.shape == (2, PROMPT.shape[1] + NEW_TOKENS)
    assert torch.equal(kv[0], tl[0])
    done = PROMPT.shape[1] + step + 1
    assert torch.equal(kv[1, :done], tl[1, :done])
    assert tl[1, done - 1] == eos


def test_finished_rows_padding_token(tpair: Pair) -> None:
    """Pinned difference: after a row's EOS TL repeats the EOS id, kvlens writes the pad token.

    TL pads with ``eos_token_id`` when one id is given (the tokenizer's EOS when a list is);
    kvlens writes the tokenizer's pad token, so finished rows read as padding.
    """
    eos, step, kv, tl, tl_list = eos_runs(tpair.family)
    done = PROMPT.shape[1] + step + 1
    assert bool((tl[1, done:] == eos).all())
    assert bool((tl_list[1, done:] == EOS).all())
    assert bool((kv[1, done:] == PAD).all())


def test_padded_batch_generate(tpair: Pair) -> None:
    """kvlens's batched generation equals TL's generation of each prompt alone."""
    prompts = ["the cat sat on the", "a big dog", "fish"]
    kw = dict(GREEDY, max_new_tokens=6, stop_at_eos=False, return_type="tokens")
    batch = tpair.kv.generate(prompts, padding_side="left", **kw)
    for row, prompt in enumerate(prompts):
        alone = tpair.tl.generate(prompt, **kw)[0]
        assert torch.equal(batch[row][batch[row] != PAD], alone)


def test_tl_batched_generate_attends_to_padding() -> None:
    """Pinned difference: TL 2.18's ``generate`` ignores the padding of a left-padded batch.

    TL's generate runs the model from embeddings (``start_at_layer=0``) and passes no attention
    mask, so a short prompt's row attends to its pad tokens (and, with learned positions, counts
    them). kvlens masks them: its batch rows equal single-prompt runs (test above).
    """
    pair = text_pair("llama")
    prompts = ["the cat sat on the", "a big dog"]
    kw = dict(GREEDY, max_new_tokens=6, stop_at_eos=False, return_type="tokens")
    tl_batch = pair.tl.generate(prompts, padding_side="left", **kw)
    uncached = pair.tl.generate(prompts, padding_side="left", use_past_kv_cache=False, **kw)
    assert torch.equal(tl_batch, uncached)  # consistently so, with or without its cache
    alone = pair.tl.generate(prompts[1], **kw)[0]
    assert not torch.equal(tl_batch[1][tl_batch[1] != PAD], alone)
    kv_batch = pair.kv.generate(prompts, padding_side="left", **kw)
    assert torch.equal(kv_batch[1][kv_batch[1] != PAD], alone)


def test_generated_text(tpair: Pair) -> None:
    """Text as TL decodes it (special tokens left out); pinned difference: a list gives a list.

    TL returns a plain string for a one-item list of prompts; kvlens returns a list for a list.
    """
    kw = dict(GREEDY, max_new_tokens=4, stop_at_eos=False)
    tl = tpair.tl.generate("the cat", **kw)
    kv = tpair.kv.generate("the cat", **kw)
    assert not tl.startswith("<bos>")
    assert kv == tl
    assert isinstance(tpair.tl.generate(["the cat"], **kw), str)
    assert tpair.kv.generate(["the cat"], **kw) == [kv]


def test_generate_token_input_without_tokenizer(pair: Pair) -> None:
    """Pinned difference: TL's ``generate`` requires a tokenizer even for token input."""
    tokens = random_tokens(3, 1, 4)
    kw = dict(GREEDY, max_new_tokens=3, stop_at_eos=False)
    with pytest.raises(AssertionError):
        pair.tl.generate(tokens, **kw)
    assert pair.kv.generate(tokens, **kw).shape == (1, 7)


def test_generate_pads_prompts_left_by_default(tpair: Pair) -> None:
    """Pinned difference: kvlens's ``generate`` pads a batch of prompts on the left by default.

    TL pads on its tokenizer's side, right by default, so a short prompt's new tokens come after
    its pad tokens. kvlens pads generation input on the left unless told otherwise (its
    ``to_tokens`` and ``forward`` keep TL's right).
    """
    prompts = ["the cat sat on the", "a"]
    kw = dict(GREEDY, max_new_tokens=4, stop_at_eos=False, return_type="tokens")
    width = tpair.tl.to_tokens(prompts).shape[1]
    tl, kv = tpair.tl.generate(prompts, **kw), tpair.kv.generate(prompts, **kw)
    assert tl.shape == kv.shape == (2, width + 4)
    assert bool((tl[1, 2:width] == PAD).all())  # "<bos> a" then padding, then new tokens
    assert bool((kv[1, : width - 2] == PAD).all())
    assert torch.equal(kv, tpair.kv.generate(prompts, padding_side="left", **kw))
