"""Many rows after one shared, frozen prefix: each row's logits are those of the row run alone.

The reference for row ``i`` is one uncached forward pass over the prefix's real tokens, the row's
real suffix tokens and its decoded tokens, concatenated.
"""

from __future__ import annotations

import pytest
import torch
from tests.helpers import model_pair, padding_mask, tokens_for

from kvlens import KeyValueCache, SharedPrefixCache
from kvlens.model import HookedTransformer

ATOL = 1e-4
FAMILIES = ("gpt2", "pythia", "llama", "mistral")  # learned positions, NeoX rotary, GQA, MQA
N_PREFIX, N_SUFFIX, N_ROWS, N_STEPS = 9, 6, 3, 3


@pytest.fixture(params=FAMILIES)
def model(request: pytest.FixtureRequest) -> HookedTransformer:
    return model_pair(request.param)[1]


def snapshot(cache: KeyValueCache) -> list[torch.Tensor]:
    """Copies of everything a cache holds: keys, values and mask, committed positions only."""
    kept = [cache.previous_attention_mask.clone()]
    for entry in cache:
        kept += [entry.past_keys.clone(), entry.past_values.clone()]
    return kept


def assert_unchanged(cache: KeyValueCache, before: list[torch.Tensor]) -> None:
    after = snapshot(cache)
    assert len(after) == len(before)
    for a, b in zip(after, before, strict=True):
        assert a.shape == b.shape and torch.equal(a, b)


def row_alone(
    model: HookedTransformer, prefix: torch.Tensor, prefix_mask: torch.Tensor, *parts
) -> torch.Tensor:
    """Logits of the prefix's real tokens then ``parts`` ((tokens, mask) pairs), real ones only."""
    real = [prefix[prefix_mask.bool()]] + [t[m.bool()] for t, m in parts]
    tokens = torch.cat(real)[None]
    return model(tokens)[0, len(real[0]) :]


@pytest.mark.parametrize("suffix_side", ["left", "right", "none"])
@pytest.mark.parametrize("prefix_padded", [False, True], ids=["prefix", "padded_prefix"])
@torch.no_grad()
def test_rows_equal_rows_run_alone(
    model: HookedTransformer, suffix_side: str, prefix_padded: bool
) -> None:
    prefix = tokens_for(20, 1, N_PREFIX)
    prefix_mask = padding_mask(1, N_PREFIX, "left", pads=(2,) if prefix_padded else (0,))
    suffix = tokens_for(21, N_ROWS, N_SUFFIX)
    suffix_mask = padding_mask(N_ROWS, N_SUFFIX, suffix_side, pads=(1, 0, 3))
    steps = tokens_for(22, N_ROWS, N_STEPS)
    shared_prefix = model.prefill(prefix, attention_mask=prefix_mask).freeze()
    before = snapshot(shared_prefix)
    shared = SharedPrefixCache.from_prefix(shared_prefix, N_ROWS)
    got = [model(suffix, attention_mask=suffix_mask, past_kv_cache=shared)]
    for step in range(N_STEPS):  # decode steps extend every row's suffix
        got.append(model(steps[:, step : step + 1], past_kv_cache=shared))
    logits = torch.cat(got, dim=1)
    masks = torch.cat((suffix_mask, torch.ones(N_ROWS, N_STEPS, dtype=torch.long)), dim=1)
    for row in range(N_ROWS):
        expected = row_alone(
            model,
            prefix[0],
            prefix_mask[0],
            (suffix[row], suffix_mask[row]),
            (steps[row], masks[row, N_SUFFIX:]),
        )
        assert torch.allclose(logits[row][masks[row].bool()], expected, atol=ATOL)
    assert shared.suffix.seq_len == N_SUFFIX + N_STEPS
    assert_unchanged(shared_prefix, before)


@torch.no_grad()
def test_frozen_batch_one_cache_is_shared_by_rows(model: HookedTransformer) -> None:
    """``model(rows, past_kv_cache=frozen_prefix)`` shares the prefix and leaves it unchanged."""
    prefix = tokens_for(23, 1, N_PREFIX)
    suffix = tokens_for(24, N_ROWS, N_SUFFIX)
    mask = padding_mask(N_ROWS, N_SUFFIX, "left", pads=(0, 2, 1))
    cache = model.prefill(prefix).freeze()
    before = snapshot(cache)
    storage = [entry.past_keys.data_ptr() for entry in cache]
    for _ in range(2):
        logits = model(suffix, attention_mask=mask, past_kv_cache=cache)
        for row in range(N_ROWS):
            expected = row_alone(model, prefix[0], torch.ones(N_PREFIX), (suffix[row], mask[row]))
            assert torch.allclose(logits[row][mask[row].bool()], expected, atol=ATOL)
    assert_unchanged(cache, before)
    assert cache.seq_len == N_PREFIX and cache.frozen
    assert [entry.past_keys.data_ptr() for entry in cache] == storage


@torch.no_grad()
def test_generate_continues_every_row(model: HookedTransformer) -> None:
    prefix = tokens_for(25, 1, N_PREFIX)
    suffix = tokens_for(26, N_ROWS, 4)
    mask = padding_mask(N_ROWS, 4, "left", pads=(0, 1, 2))
    cache = model.prefill(prefix).freeze()
    before = snapshot(cache)
    kwargs = dict(max_new_tokens=4, do_sample=False, stop_at_eos=False, verbose=False)
    out = model.generate(suffix, attention_mask=mask, past_kv_cache=cache, **kwargs)
    assert out.shape == (N_ROWS, 4 + 4)
    for row in range(N_ROWS):
        alone = torch.cat((prefix[0], suffix[row][mask[row].bool()]))[None]
        expected = model.generate(alone, use_past_kv_cache=False, **kwargs)[0, -4:]
        assert torch.equal(out[row, -4:], expected)
    assert_unchanged(cache, before)
    # One row after a frozen prefix also keeps its own tokens across decode steps.
    one = model.generate(suffix[:1], past_kv_cache=cache, **kwargs)
    alone = torch.cat((prefix[0], suffix[0]))[None]
    expected = model.generate(alone, use_past_kv_cache=False, **kwargs)[0, -4:]
    assert torch.equal(one[0, -4:], expected)


@torch.no_grad()
def test_pattern_hook_sees_prefix_and_suffix(model: HookedTransformer) -> None:
    """With a pattern hook, the eager path gives TL's shapes, the row's pattern and its logits."""
    prefix = tokens_for(27, 1, N_PREFIX)
    suffix = tokens_for(28, N_ROWS, N_SUFFIX)
    mask = padding_mask(N_ROWS, N_SUFFIX, "right", pads=(0, 2, 1))
    cache = model.prefill(prefix).freeze()
    fast = model(suffix, attention_mask=mask, past_kv_cache=cache)
    patterns: list[torch.Tensor] = []
    hook_name = "blocks.1.attn.hook_pattern"
    with model.hooks(fwd_hooks=[(hook_name, lambda t, hook: patterns.append(t.clone()))]):
        hooked = model(suffix, attention_mask=mask, past_kv_cache=cache)
    n_heads = model.cfg.n_heads
    assert [p.shape for p in patterns] == [(N_ROWS, n_heads, N_SUFFIX, N_PREFIX + N_SUFFIX)]
    assert torch.allclose(hooked, fast, atol=1e-5)
    # Row 0 has no padding: its pattern is that of the row run after a batch-1 prefix.
    row_cache = model.prefill(prefix)
    with model.hooks(fwd_hooks=[(hook_name, lambda t, hook: patterns.append(t.clone()))]):
        model(suffix[:1], past_kv_cache=row_cache)
    assert torch.allclose(patterns[0][:1], patterns[1], atol=1e-5)


@torch.no_grad()
def test_split_forward_over_shared_prefix(model: HookedTransformer) -> None:
    """``stop_at_layer`` then ``start_at_layer`` over one shared cache equals one full pass."""
    prefix = tokens_for(29, 1, N_PREFIX)
    suffix = tokens_for(30, N_ROWS, N_SUFFIX)
    mask = padding_mask(N_ROWS, N_SUFFIX, "left", pads=(0, 2, 1))
    cache = model.prefill(prefix).freeze()
    expected = model(suffix, attention_mask=mask, past_kv_cache=cache)
    shared = SharedPrefixCache.from_prefix(cache, N_ROWS)
    resid = model(suffix, attention_mask=mask, past_kv_cache=shared, stop_at_layer=1)
    got = model(resid, past_kv_cache=shared, start_at_layer=1)
    assert torch.allclose(got, expected, atol=1e-5)


@torch.no_grad()
def test_prefix_memory_does_not_grow_with_rows(model: HookedTransformer) -> None:
    prefix = model.prefill(tokens_for(31, 1, N_PREFIX)).freeze()
    sizes = []
    for rows in (1, 4, 16):
        shared = SharedPrefixCache.from_prefix(prefix, rows)
        model(tokens_for(32, rows, 2), past_kv_cache=shared)
        assert shared.prefix is prefix and shared.suffix.seq_len == 2
        sizes.append(shared.nbytes - shared.suffix.nbytes)
    assert sizes == [prefix.nbytes] * 3


def test_errors(model: HookedTransformer) -> None:
    prefix = model.prefill(tokens_for(33, 1, N_PREFIX))
    rows = tokens_for(34, N_ROWS, 2)
    with pytest.raises(ValueError, match="freeze"):
        model(rows, past_kv_cache=prefix)
    with pytest.raises(ValueError, match="not frozen"):
        SharedPrefixCache.from_prefix(prefix, N_ROWS)
    two = model.prefill(tokens_for(35, 2, N_PREFIX)).freeze()
    with pytest.raises(ValueError, match="batch size 2 and the input 3 rows"):
        model(rows, past_kv_cache=two)
    with pytest.raises(ValueError, match="batch size 1, this one has 2"):
        SharedPrefixCache.from_prefix(two, N_ROWS)
    shared = SharedPrefixCache.from_prefix(prefix.freeze(), N_ROWS)
    with pytest.raises(ValueError, match="shared by 3 rows, the input has 2"):
        model(rows[:2], past_kv_cache=shared)
    prefix.unfreeze()
    with pytest.raises(ValueError, match="shared prefix changed"):
        model(rows, past_kv_cache=shared)
