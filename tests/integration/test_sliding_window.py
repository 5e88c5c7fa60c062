"""Sliding-window attention (Gemma 2, Mistral, Qwen2) equals HF's, cached and uncached, far past
the window (fp32)."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from tests.helpers import (
    WINDOW_FAMILIES,
    WINDOW_OVERRIDES,
    hf_positions,
    make_hf_model,
    padding_mask,
    tiny_tokenizer,
    tokens_for,
)

from kvlens.cache import KeyValueCache
from kvlens.components import decode_plan
from kvlens.kernels import build
from kvlens.model import HookedTransformer

ATOL = 1e-4
LONG_CTX, LONG_WINDOW, NEW_TOKENS = 512, 8, 300


@functools.cache
def window_pair(family: str, long: bool = False) -> tuple[Any, HookedTransformer]:
    """``(hf_model, kvlens_model)`` with a small window; ``long``: 512 positions, window 8."""
    overrides = dict(WINDOW_OVERRIDES[family])
    if long:
        overrides |= dict(max_position_embeddings=LONG_CTX, sliding_window=LONG_WINDOW)
    hf_model = make_hf_model(family, **overrides)
    hf_model.generation_config.eos_token_id = None  # greedy runs go the full length
    hf_model.generation_config.pad_token_id = 0
    return hf_model, HookedTransformer.from_hf_model(hf_model)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.mark.parametrize("family", WINDOW_FAMILIES)
def test_config_has_local_layers(family: str) -> None:
    _, model = window_pair(family)
    cfg = model.cfg
    windows = [cfg.layer_window(i) for i in range(cfg.n_layers)]
    expected = {
        "gemma2": [6, None, 6],  # HF 4.57: even layers slide
        "mistral": [5, 5],
        "qwen2": [None, 5],  # max_window_layers=1
    }[family]
    assert windows == expected
    assert cfg.n_ctx == 64  # max_position_embeddings, not capped at the window


@pytest.mark.parametrize("family", WINDOW_FAMILIES)
@torch.no_grad()
def test_logits_match_hf_past_the_window(family: str) -> None:
    hf_model, model = window_pair(family)
    tokens = tokens_for(40, 2, 24)
    expected = hf_model(tokens).logits
    assert max_diff(model(tokens), expected) <= ATOL
    # The window changes the result here, so the comparison above tests it.
    unwindowed = make_hf_model(family, **WINDOW_OVERRIDES[family] | dict(sliding_window=64))
    assert max_diff(unwindowed(tokens).logits, expected) > 1e-2


@pytest.mark.parametrize("family", WINDOW_FAMILIES)
@torch.no_grad()
def test_logits_match_hf_left_padded(family: str) -> None:
    hf_model, model = window_pair(family)
    tokens = tokens_for(41, 3, 24)
    mask = padding_mask(3, 24, "left", pads=(0, 3, 9))
    expected = hf_model(tokens, attention_mask=mask, position_ids=hf_positions(mask)).logits
    got = model(tokens, attention_mask=mask)
    real = mask.bool()
    assert (got - expected)[real].abs().max().item() <= ATOL


@pytest.mark.parametrize("family", WINDOW_FAMILIES)
@torch.no_grad()
def test_cached_equals_uncached_past_the_window(family: str) -> None:
    _, model = window_pair(family)
    tokens = tokens_for(42, 2, 30)
    expected = model(tokens)
    cache = KeyValueCache.init_cache(model.cfg, None, batch_size=2)
    pieces = [model(tokens[:, :4], past_kv_cache=cache)]  # shorter than the window
    for i in range(4, 20):  # one token at a time, across the window's edge
        pieces.append(model(tokens[:, i : i + 1], past_kv_cache=cache))
    pieces.append(model(tokens[:, 20:27], past_kv_cache=cache))  # a chunk longer than the window
    pieces.append(model(tokens[:, 27:], past_kv_cache=cache))
    assert max_diff(torch.cat(pieces, dim=1), expected) <= ATOL
    assert cache.seq_len == 30


@pytest.mark.parametrize("family", WINDOW_FAMILIES)
@torch.no_grad()
def test_prefill_then_decode_left_padded(family: str) -> None:
    _, model = window_pair(family)
    tokens = tokens_for(43, 3, 26)
    mask = padding_mask(3, 26, "left", pads=(0, 4, 11))
    expected = model(tokens, attention_mask=mask)
    cache = model.prefill(tokens[:, :14], attention_mask=mask[:, :14], capacity=26)
    pieces = [model(tokens[:, i : i + 1], past_kv_cache=cache) for i in range(14, 26)]
    real = mask[:, 14:].bool()
    assert (torch.cat(pieces, dim=1) - expected[:, 14:])[real].abs().max().item() <= ATOL


def _greedy_against_hf(family: str) -> tuple[torch.Tensor, torch.Tensor]:
    """kvlens's and HF's greedy continuations of two 12-token prompts, 300 tokens each."""
    hf_model, model = window_pair(family, long=True)
    prompt = tokens_for(44, 2, 12)
    with torch.no_grad():
        expected = hf_model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
        )
    got = model.generate(
        prompt, max_new_tokens=NEW_TOKENS, do_sample=False, stop_at_eos=False, verbose=False
    )
    return got, expected


@pytest.mark.parametrize("family", WINDOW_FAMILIES)
@torch.no_grad()
def test_greedy_decoding_hundreds_of_tokens_past_the_window(family: str) -> None:
    hf_model, model = window_pair(family, long=True)
    got, expected = _greedy_against_hf(family)
    assert got.shape == expected.shape == (2, 12 + NEW_TOKENS)
    assert torch.equal(got, expected)
    # The whole final sequence, run at once by both: the last steps' logits agree.
    last = slice(-50, None)
    assert max_diff(model(got)[:, last], hf_model(got).logits[:, last]) <= ATOL


@pytest.mark.parametrize("family", WINDOW_FAMILIES)
@torch.no_grad()
def test_greedy_decoding_left_padded_past_the_window(family: str) -> None:
    """HF counts the window by cache index, padding included; a left-padded row still gets
    what HF gives it."""
    hf_model, model = window_pair(family, long=True)
    mask = padding_mask(3, 14, "left", pads=(0, 3, 10))
    prompt = tokens_for(46, 3, 14).masked_fill(mask == 0, 0)
    expected = hf_model.generate(prompt, attention_mask=mask, max_new_tokens=100, do_sample=False)
    got = model.generate(
        prompt,
        attention_mask=mask,
        max_new_tokens=100,
        do_sample=False,
        stop_at_eos=False,
        verbose=False,
    )
    assert torch.equal(got, expected)


@pytest.mark.skipif(not build.available(), reason="native kernels not built here")
@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_native_decode_layer_reads_only_the_window(
    family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mistral and Qwen2 decode through the fused native layer, which starts at the window."""
    _, model = window_pair(family, long=True)
    assert all(block.decode_plan is not None for block in model.blocks)
    starts: list[int] = []
    native_layer = decode_plan.decode_layer

    def counted(*args: Any, **kwargs: Any) -> Any:
        out = native_layer(*args, **kwargs)
        if out is not None:
            starts.append(kwargs["first"])
        return out

    monkeypatch.setattr(decode_plan, "decode_layer", counted)
    got, expected = _greedy_against_hf(family)
    assert torch.equal(got, expected)
    n_steps = NEW_TOKENS - 1  # the first new token comes from the prefill
    assert len(starts) == n_steps * model.cfg.n_layers
    assert max(starts) == 12 + NEW_TOKENS - 1 - LONG_WINDOW


def test_gemma2_declines_the_native_decode_layer() -> None:
    _, model = window_pair("gemma2", long=True)
    assert all(block.decode_plan is None for block in model.blocks)
    assert all(block.decode_plan_reason for block in model.blocks)


@pytest.mark.parametrize("family", WINDOW_FAMILIES)
@torch.no_grad()
def test_from_local_folder_and_from_hf_model(family: str, tmp_path: Any) -> None:
    hf_model, _ = window_pair(family)
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    tiny_tokenizer().save_pretrained(tmp_path)
    loaded = HookedTransformer.from_pretrained_no_processing(tmp_path, progress=False)
    converted = HookedTransformer.from_hf_model(hf_model)
    assert loaded.cfg.window_size == converted.cfg.window_size is not None
    assert loaded.cfg.attn_types == converted.cfg.attn_types
    assert loaded.tokenizer is not None and loaded.tokenizer.eos_token_id == 1
    tokens = 3 + tokens_for(45, 2, 20) % 94  # ids with words (0, 1, 2 are special)
    expected = hf_model(tokens).logits
    assert max_diff(loaded(tokens), expected) <= ATOL
    assert max_diff(converted(tokens), expected) <= ATOL
    text = " ".join(f"w{int(t)}" for t in tokens[0])
    assert max_diff(loaded(text)[0], expected[0]) <= ATOL
