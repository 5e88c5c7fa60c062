"""The key-value cache contract: prefill and decode steps against TL's cache, step by step.

TL's ``HookedTransformerKeyValueCache`` and kvlens's ``KeyValueCache`` are driven the same way:
``init_cache(cfg, device, batch_size)``, then ``model(tokens, past_kv_cache=cache)`` per chunk.
TL needs an attention mask (or a tokenizer to infer one) whenever a cache is given, so the TL
calls here pass one.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tests.compat.pairs import PAD, Pair, assert_same, random_tokens

import kvlens


def tl_cache(pair: Pair, batch: int) -> Any:
    from transformer_lens.past_key_value_caching import HookedTransformerKeyValueCache

    return HookedTransformerKeyValueCache.init_cache(pair.tl.cfg, "cpu", batch)


def kv_cache(pair: Pair, batch: int) -> kvlens.KeyValueCache:
    return kvlens.KeyValueCache.init_cache(pair.kv.cfg, "cpu", batch)


def ones(tokens: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(tokens)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
def test_prefill_then_decode(pair: Pair, padded: bool) -> None:
    tokens = random_tokens(0, 2, 10)
    mask = torch.ones(2, 6, dtype=torch.long)
    if padded:
        mask[1, :3] = 0
    prompt = torch.where(mask.bool(), tokens[:, :6], PAD)
    kv_c, tl_c = kv_cache(pair, 2), tl_cache(pair, 2)
    kv = pair.kv(prompt, past_kv_cache=kv_c, attention_mask=mask)
    tl = pair.tl(prompt, past_kv_cache=tl_c, attention_mask=mask)
    assert_same(kv[mask.bool()], tl[mask.bool()], "prefill logits at real tokens")
    for new in (tokens[:, 6:7], tokens[:, 7:8], tokens[:, 8:]):  # two steps, then a chunk
        kv = pair.kv(new, past_kv_cache=kv_c)
        tl = pair.tl(new, past_kv_cache=tl_c, attention_mask=ones(new))
        assert_same(kv, tl, f"logits of {new.shape[1]} new token(s)")
    full_mask = kv_c.previous_attention_mask
    assert torch.equal(full_mask.long(), tl_c.previous_attention_mask.long())
    real = full_mask.bool()  # a pad query's output, hence later layers' pad values, differ
    for layer in range(pair.kv.cfg.n_layers):
        kv_values, tl_values = kv_c[layer].past_values, tl_c[layer].past_values
        assert_same(kv_values[real], tl_values[real], f"values of layer {layer}")
        assert kv_c[layer].past_keys.shape == tl_c[layer].past_keys.shape


def test_cached_equals_uncached(pair: Pair) -> None:
    tokens = random_tokens(1, 2, 9)
    kv_c, tl_c = kv_cache(pair, 2), tl_cache(pair, 2)
    pair.kv(tokens[:, :5], past_kv_cache=kv_c)
    pair.tl(tokens[:, :5], past_kv_cache=tl_c, attention_mask=ones(tokens[:, :5]))
    kv = pair.kv(tokens[:, 5:], past_kv_cache=kv_c)
    tl = pair.tl(tokens[:, 5:], past_kv_cache=tl_c, attention_mask=ones(tokens[:, 5:]))
    full = pair.tl(tokens)[:, 5:]
    assert_same(tl, full, "TL cached vs uncached")
    assert_same(kv, full, "kvlens cached vs TL uncached")


def test_decode_step_activations(pair: Pair) -> None:
    """A cached step fires the same hooks with the same values, except ``hook_rot_k``.

    Pinned difference: kvlens's cache holds keys after rotary, so its ``hook_rot_k`` covers the
    new tokens only ``[batch, pos, kv_head, d_head]``; TL re-rotates every cached key each step
    and its ``hook_rot_k`` covers all of them ``[batch, kv_pos, kv_head, d_head]``. kvlens's
    equals the last ``pos`` positions of TL's.
    """
    tokens = random_tokens(2, 2, 8)
    kv_c, tl_c = kv_cache(pair, 2), tl_cache(pair, 2)
    pair.kv(tokens[:, :7], past_kv_cache=kv_c)
    pair.tl(tokens[:, :7], past_kv_cache=tl_c, attention_mask=ones(tokens[:, :7]))
    step = tokens[:, 7:]
    kv_logits, kv_acts = pair.kv.run_with_cache(step, past_kv_cache=kv_c)
    tl_logits, tl_acts = pair.tl.run_with_cache(step, past_kv_cache=tl_c, attention_mask=ones(step))
    assert_same(kv_logits, tl_logits, "logits")
    assert set(kv_acts.keys()) == set(tl_acts.keys())
    rotary = pair.kv.cfg.positional_embedding_type == "rotary"
    for name in sorted(tl_acts.keys()):
        if name.endswith("hook_rot_k"):
            assert rotary
            assert kv_acts[name].shape[1] == 1 and tl_acts[name].shape[1] == 8
            assert_same(kv_acts[name], tl_acts[name][:, -1:], name)
        else:
            assert_same(kv_acts[name], tl_acts[name], name)


def test_cache_holds_keys_after_rotary(pair: Pair) -> None:
    """Pinned difference: ``past_keys`` are rotated in kvlens, unrotated in TL (rotary models).

    kvlens's equal TL's ``hook_rot_k`` over all keys; TL's equal the ``hook_k`` that each chunk
    fired. Without rotary the two caches hold the same keys.
    """
    tokens = random_tokens(3, 2, 6)
    kv_c, tl_c = kv_cache(pair, 2), tl_cache(pair, 2)
    names = ["blocks.1.attn.hook_k", "blocks.1.attn.hook_rot_k"]
    _, kv_acts = pair.kv.run_with_cache(
        tokens, past_kv_cache=kv_c, names_filter=lambda n: n in names
    )
    _, tl_acts = pair.tl.run_with_cache(
        tokens, past_kv_cache=tl_c, attention_mask=ones(tokens), names_filter=lambda n: n in names
    )
    kv_keys, tl_keys = kv_c[1].past_keys, tl_c[1].past_keys
    if pair.kv.cfg.positional_embedding_type == "rotary":
        assert_same(kv_keys, tl_acts["blocks.1.attn.hook_rot_k"], "kvlens keys are rotated")
        assert_same(tl_keys, kv_acts["blocks.1.attn.hook_k"], "TL keys are not")
        assert not torch.allclose(kv_keys, tl_keys, atol=1e-3)
    else:
        assert_same(kv_keys, tl_keys, "keys")


def test_frozen_prefix(pair: Pair) -> None:
    """A frozen cache serves several continuations without growing, in both libraries."""
    tokens = random_tokens(4, 1, 9)
    kv_c, tl_c = kv_cache(pair, 1), tl_cache(pair, 1)
    pair.kv(tokens[:, :5], past_kv_cache=kv_c)
    pair.tl(tokens[:, :5], past_kv_cache=tl_c, attention_mask=ones(tokens[:, :5]))
    kv_c.freeze()
    tl_c.freeze()
    for continuation in (tokens[:, 5:7], tokens[:, 7:9]):
        kv = pair.kv(continuation, past_kv_cache=kv_c)
        tl = pair.tl(continuation, past_kv_cache=tl_c, attention_mask=ones(continuation))
        assert_same(kv, tl, "logits after the frozen prefix")
        assert kv_c[0].past_keys.shape[1] == tl_c[0].past_keys.shape[1] == 5
        assert kv_c.previous_attention_mask.shape[1] == tl_c.previous_attention_mask.shape[1] == 5


def test_cache_without_mask_or_tokenizer(pair: Pair) -> None:
    """Pinned difference: with a cache TL needs a mask or a tokenizer; kvlens assumes all real.

    TL 2.18 builds a mask whenever a cache is given and can only infer one from pad tokens, so
    without a tokenizer it raises. kvlens's default mask is all ones.
    """
    tokens = random_tokens(5, 1, 4)
    with pytest.raises(ValueError, match="without a tokenizer"):
        pair.tl(tokens, past_kv_cache=tl_cache(pair, 1))
    assert_same(pair.kv(tokens, past_kv_cache=kv_cache(pair, 1)), pair.tl(tokens), "logits")
