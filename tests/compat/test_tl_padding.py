"""Padded batches: real tokens see, and produce, what TL gives them.

Activations at pad positions are compared only where the two libraries define them alike: a
pad query's attention differs on purpose (see ``test_pad_query_pattern``).
"""

from __future__ import annotations

import pytest
import torch
from tests.compat.pairs import PAD, Pair, assert_same, random_tokens


def padded(seed: int, side: str, pads: tuple[int, ...] = (0, 3, 5), pos: int = 8):
    """Tokens ``[len(pads), pos]`` with ``pads[i]`` pads on ``side`` of row i, and their mask."""
    tokens = random_tokens(seed, len(pads), pos)
    mask = torch.ones_like(tokens)
    for row, n_pad in enumerate(pads):
        if n_pad:
            mask[row, :n_pad] = 0
    if side == "right":
        mask = mask.flip(-1)
    return torch.where(mask.bool(), tokens, PAD), mask


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_with_mask(pair: Pair, side: str) -> None:
    tokens, mask = padded(0, side)
    real = mask.bool()
    kv_logits, kv_cache = pair.kv.run_with_cache(tokens, attention_mask=mask)
    tl_logits, tl_cache = pair.tl.run_with_cache(tokens, attention_mask=mask)
    assert_same(kv_logits[real], tl_logits[real], "logits at real tokens")
    for name in sorted(tl_cache.keys()):
        kv_act, tl_act = kv_cache[name], tl_cache[name]
        if name.endswith(("hook_attn_scores", "hook_pattern")):  # [batch, head, pos, kv_pos]
            kv_act, tl_act = kv_act.transpose(1, 2), tl_act.transpose(1, 2)
        assert_same(kv_act[real], tl_act[real], f"{name} at real tokens")


def test_padded_rows_equal_unpadded_runs(pair: Pair) -> None:
    """Both libraries give a left-padded row what the row alone gets (positions skip pads)."""
    tokens, mask = padded(1, "left")
    kv, tl = pair.kv(tokens, attention_mask=mask), pair.tl(tokens, attention_mask=mask)
    for row in range(tokens.shape[0]):
        alone = tokens[row][mask[row].bool()][None]
        assert_same(kv[row, -1], pair.tl(alone)[0, -1], f"kvlens row {row}")
        assert_same(tl[row, -1], pair.tl(alone)[0, -1], f"TL row {row}")


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("per_token", [False, True])
def test_padded_loss(pair: Pair, side: str, per_token: bool) -> None:
    tokens, mask = padded(2, side)
    kw = dict(return_type="loss", attention_mask=mask, loss_per_token=per_token)
    assert_same(pair.kv(tokens, **kw), pair.tl(tokens, **kw), "loss")


def test_pad_query_pattern(pair: Pair) -> None:
    """Pinned difference: a pad query attends to itself in kvlens; TL's pattern row is all zero.

    TL masks every key of a left-pad query, the softmax gives NaN and TL writes zeros. kvlens
    lets the query see itself so that its eager and fused attention paths agree and no NaN is
    made. Real queries never attend to pad keys in either library.
    """
    tokens, mask = padded(3, "left")
    name = "blocks.0.attn.hook_pattern"
    _, kv_cache = pair.kv.run_with_cache(tokens, attention_mask=mask, names_filter=name)
    _, tl_cache = pair.tl.run_with_cache(tokens, attention_mask=mask, names_filter=name)
    kv_pattern, tl_pattern = kv_cache[name], tl_cache[name]
    row = 2  # 5 left pads
    eye = torch.eye(5).expand(kv_pattern.shape[1], 5, 5)
    assert torch.equal(tl_pattern[row, :, :5, :], torch.zeros_like(tl_pattern[row, :, :5, :]))
    assert torch.equal(kv_pattern[row, :, :5, :5], eye)
    assert torch.equal(kv_pattern[row, :, :5, 5:], torch.zeros_like(kv_pattern[row, :, :5, 5:]))
    assert_same(kv_pattern[row, :, 5:], tl_pattern[row, :, 5:], "real queries' pattern")


def test_mask_inferred_from_left_pad_tokens(left_pair: Pair) -> None:
    """With a tokenizer that pads left, TL masks leading pad tokens it is given without a mask."""
    tokens, mask = padded(4, "left")
    real = mask.bool()
    tl_inferred = left_pair.tl(tokens)
    assert_same(tl_inferred[real], left_pair.tl(tokens, attention_mask=mask)[real], "TL")
    assert_same(left_pair.kv(tokens)[real], tl_inferred[real], "kvlens without a mask")
    kv_loss = left_pair.kv(tokens, return_type="loss")
    assert_same(kv_loss, left_pair.tl(tokens, return_type="loss"), "loss without a mask")


def test_text_batch_padded_left(tpair: Pair) -> None:
    """``padding_side="left"`` on a list of strings: TL infers the mask, kvlens makes one."""
    texts = ["the cat sat on the mat", "a dog", "one two three"]
    tokens = tpair.tl.to_tokens(texts, padding_side="left")
    real = tokens != PAD
    kv = tpair.kv(texts, padding_side="left")
    assert_same(kv[real], tpair.tl(texts, padding_side="left")[real], "logits at real tokens")
    kw = dict(padding_side="left", return_type="loss")
    assert_same(tpair.kv(texts, **kw), tpair.tl(texts, **kw), "loss")
