"""Forward passes: logits, loss, tokenization and partial runs equal TransformerLens's."""

from __future__ import annotations

import pytest
import torch
from tests.compat.bridge import to_transformer_lens
from tests.compat.pairs import (
    PAD,
    Pair,
    assert_same,
    random_kvlens_model,
    random_tokens,
    tiny_tokenizer,
)


def test_logits(pair: Pair) -> None:
    tokens = random_tokens(0, 3, 12)
    assert_same(pair.kv(tokens), pair.tl(tokens), "logits")


@pytest.mark.parametrize("per_token", [False, True])
def test_loss(pair: Pair, per_token: bool) -> None:
    tokens = random_tokens(1, 2, 10)
    kv = pair.kv(tokens, return_type="loss", loss_per_token=per_token)
    tl = pair.tl(tokens, return_type="loss", loss_per_token=per_token)
    assert_same(kv, tl, "loss")
    kv_both, tl_both = pair.kv(tokens, return_type="both"), pair.tl(tokens, return_type="both")
    assert_same(kv_both.logits, tl_both.logits, "both.logits")
    assert_same(kv_both.loss, tl_both.loss, "both.loss")


def test_return_type_none(pair: Pair) -> None:
    tokens = random_tokens(2, 1, 4)
    assert pair.kv(tokens, return_type=None) is None
    assert pair.tl(tokens, return_type=None) is None


def test_stop_and_start_at_layer(pair: Pair) -> None:
    tokens = random_tokens(3, 2, 8)
    kv_resid = pair.kv(tokens, stop_at_layer=1)
    tl_resid = pair.tl(tokens, stop_at_layer=1)
    assert_same(kv_resid, tl_resid, "residual entering block 1")
    assert_same(pair.kv(tl_resid, start_at_layer=1), pair.tl(tl_resid, start_at_layer=1), "logits")
    kv_loss = pair.kv(tl_resid, start_at_layer=1, tokens=tokens, return_type="loss")
    tl_loss = pair.tl(tl_resid, start_at_layer=1, tokens=tokens, return_type="loss")
    assert_same(kv_loss, tl_loss, "loss from block 1")


def test_text_input(tpair: Pair) -> None:
    text = "the cat sat on the mat"
    assert_same(tpair.kv(text), tpair.tl(text), "logits of a string (BOS prepended)")
    kv = tpair.kv(text, prepend_bos=False, return_type="loss")
    assert_same(kv, tpair.tl(text, prepend_bos=False, return_type="loss"), "loss without BOS")


def test_tokenization_helpers(tpair: Pair) -> None:
    texts = ["the cat sat on the mat", "a dog", "one two three"]
    for kwargs in ({}, {"prepend_bos": False}, {"padding_side": "left"}):
        assert torch.equal(tpair.kv.to_tokens(texts, **kwargs), tpair.tl.to_tokens(texts, **kwargs))
    assert torch.equal(tpair.kv.to_tokens(texts[0]), tpair.tl.to_tokens(texts[0]))
    assert tpair.kv.to_str_tokens(texts[0]) == tpair.tl.to_str_tokens(texts[0])
    ids = tpair.kv.to_tokens(texts[1])[0]
    assert tpair.kv.to_string(ids) == tpair.tl.to_string(ids)


def test_to_tokens_pads_right_by_default(tpair: Pair) -> None:
    """TL pads on the right unless told otherwise, whatever the tokenizer object says.

    The tiny tokenizer itself says ``padding_side="left"`` (as SmolLM2's does); TL's
    ``set_tokenizer`` sets its copy to the model's ``default_padding_side``, "right" by default.
    """
    texts = ["the cat sat on the mat", "a dog"]
    tl_tokens = tpair.tl.to_tokens(texts)
    assert tl_tokens[1, -1] == PAD
    assert torch.equal(tpair.kv.to_tokens(texts), tl_tokens)


def test_text_batch_logits(tpair: Pair) -> None:
    """A list of strings: padded the same way, the real positions' logits agree."""
    texts = ["the cat sat on the mat", "a dog"]
    real = tpair.tl.to_tokens(texts) != PAD
    assert_same(tpair.kv(texts)[real], tpair.tl(texts)[real], "logits at real tokens")


def test_text_batch_loss_ignores_padding_in_kvlens_only(tpair: Pair) -> None:
    """Pinned difference: TL's loss of a right-padded text batch counts the pad predictions.

    TL computes an attention mask only when the tokenizer pads left, a mask is given or a cache
    is used, so with its default right padding the loss averages over pad tokens too. kvlens
    masks the padding of any text batch, which equals TL given the mask explicitly.
    """
    texts = ["the cat sat on the mat", "a dog"]
    tokens = tpair.tl.to_tokens(texts)
    mask = (tokens != PAD).long()
    tl_loss = tpair.tl(texts, return_type="loss")
    assert_same(tl_loss, tpair.tl(tokens, return_type="loss"), "TL: unmasked")
    tl_masked = tpair.tl(tokens, return_type="loss", attention_mask=mask)
    assert not torch.allclose(tl_loss, tl_masked)
    assert_same(tpair.kv(texts, return_type="loss"), tl_masked, "kvlens: masked")


def test_arguments_after_return_type_follow_tl_order(pair: Pair) -> None:
    """``forward``'s arguments are TL 2.18's, in its order: ``model(tokens, "loss", True)``."""
    tokens = random_tokens(4, 1, 6)
    per_token = pair.tl(tokens, "loss", True)
    assert per_token.shape == (1, 5)
    assert_same(pair.kv(tokens, "loss", True), per_token, "per-token loss, positional")
    assert_same(pair.kv(tokens, "loss", loss_per_token=True), per_token, "per-token loss")
    # start_at_layer (6th) and tokens (7th) positionally, as TL takes them.
    resid = pair.kv(tokens, None, False, None, None, None, None, None, None, 1)
    got = pair.kv(resid, "loss", False, None, None, 1, tokens)
    assert_same(got, pair.tl(tokens, "loss"), "loss from a residual, positional")
    with pytest.raises(ValueError, match="shortformer"):
        pair.kv(tokens, "logits", False, None, None, None, None, torch.zeros(1, 6, 4))


def test_loss_fn(pair: Pair) -> None:
    tokens = random_tokens(6, 2, 7)
    mask = torch.ones_like(tokens)
    mask[1, :2] = 0
    logits = pair.kv(tokens)
    for per_token in (False, True):
        assert_same(
            pair.kv.loss_fn(logits, tokens, mask, per_token),
            pair.tl.loss_fn(pair.tl(tokens), tokens, mask, per_token),
            f"loss_fn per_token={per_token}",
        )


def test_pair_is_built_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bridge gives TL a tokenizer it keeps as is: TL never loads one by name."""
    import transformers

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"TL tried to load a tokenizer by name: {args}")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    kv = random_kvlens_model("gpt2", tokenizer=tiny_tokenizer())
    tokenizer = tiny_tokenizer()
    tl = to_transformer_lens(kv, tokenizer)
    assert tl.tokenizer is not tokenizer
    assert (tokenizer.padding_side, tl.tokenizer.padding_side) == ("left", "right")
    assert tl.cfg.default_prepend_bos and not tl.cfg.tokenizer_prepends_bos
    assert_same(kv(random_tokens(9, 1, 4)), tl(random_tokens(9, 1, 4)), "logits")
