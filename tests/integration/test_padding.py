"""Token input padded without a mask: the mask TransformerLens 2.18 infers, so each row equals
the row alone, with and without a cache, for every family."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from tests.helpers import FAMILIES, VOCAB, make_hf_model
from tests.tiny_models import smollm2_tokenizer, tiny_llama_with_tokenizer

from kvlens.cache import KeyValueCache
from kvlens.model import HookedTransformer
from kvlens.tokens import padding_mask_from_tokens

ATOL = 1e-4
PAD = VOCAB - 1  # real tokens are drawn below it
BOS = VOCAB - 2
LENGTHS = (7, 3, 5, 1)


def fake_tokenizer(pad: int = PAD, bos: int | None = BOS) -> SimpleNamespace:
    """What padding inference reads of a tokenizer: its pad, BOS and EOS ids and padding side."""
    return SimpleNamespace(pad_token_id=pad, bos_token_id=bos, eos_token_id=pad)


@pytest.fixture(scope="module", params=FAMILIES)
def model(request: pytest.FixtureRequest) -> HookedTransformer:
    hf_model = make_hf_model(request.param)
    return HookedTransformer.from_hf_model(hf_model, tokenizer=fake_tokenizer())


def rows(seed: int, lengths: tuple[int, ...] = LENGTHS, first: int | None = None) -> list:
    gen = torch.Generator().manual_seed(seed)
    out = [torch.randint(0, BOS, (n,), generator=gen) for n in lengths]
    if first is not None:
        out = [torch.cat((torch.tensor([first]), r)) for r in out]
    return out


def pad_rows(rows: list, side: str, pad: int = PAD) -> torch.Tensor:
    width = max(len(r) for r in rows)
    batch = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        if side == "left":
            batch[i, width - len(r) :] = r
        else:
            batch[i, : len(r)] = r
    return batch


def real_part(logits: torch.Tensor, n: int, side: str) -> torch.Tensor:
    return logits[-n:] if side == "left" else logits[:n]


def new_cache(model: HookedTransformer, batch: int) -> KeyValueCache:
    return KeyValueCache.init_cache(model.cfg, model.cfg.device, batch)


@pytest.fixture
def side_of(model: HookedTransformer):
    """Set the tokenizer's padding side for one test, then put back TL's default (right)."""

    def set_side(side: str) -> None:
        model.tokenizer.padding_side = side

    yield set_side
    model.tokenizer.padding_side = "right"


@torch.no_grad()
@pytest.mark.parametrize("use_cache", [False, True])
def test_left_padded_rows_equal_each_row_alone(model, side_of, use_cache):
    # The tokenizer pads on the left: TL infers the mask with or without a cache.
    side_of("left")
    parts = rows(1)
    tokens = pad_rows(parts, "left")
    cache = new_cache(model, len(parts)) if use_cache else None
    logits = model(tokens, past_kv_cache=cache)
    for i, r in enumerate(parts):
        alone = model(r[None])[0]
        assert torch.allclose(real_part(logits[i], len(r), "left"), alone, atol=ATOL), i


@torch.no_grad()
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_prefill_then_decode_equals_each_row_alone(model, side_of, side):
    # With a cache TL infers the mask on the tokenizer's side; the pads must stay masked for
    # the tokens after them too (right padding leaves real tokens' logits right even unmasked).
    side_of(side)
    parts = rows(2)
    tokens = pad_rows(parts, side)
    nxt = torch.randint(0, BOS, (len(parts), 2), generator=torch.Generator().manual_seed(3))
    cache = new_cache(model, len(parts))
    first = model(tokens, past_kv_cache=cache)
    second = model(nxt, past_kv_cache=cache)
    for i, r in enumerate(parts):
        alone = model(torch.cat((r, nxt[i]))[None])[0]
        assert torch.allclose(real_part(first[i], len(r), side), alone[: len(r)], atol=ATOL), i
        assert torch.allclose(second[i], alone[len(r) :], atol=ATOL), i


@torch.no_grad()
def test_right_padding_without_cache_is_not_masked_as_in_tl(model):
    # TL infers nothing here (right-padding tokenizer, no cache); real tokens never see the
    # trailing pads, so they are right anyway.
    parts = rows(4)
    tokens = pad_rows(parts, "right")
    logits = model(tokens)
    for i, r in enumerate(parts):
        assert torch.allclose(logits[i, : len(r)], model(r[None])[0], atol=ATOL), i


@torch.no_grad()
def test_padding_side_argument_names_the_padded_end_of_token_input(model):
    # The tokenizer pads right (TL's default), the tokens are padded left: say so.
    parts = rows(5)
    tokens = pad_rows(parts, "left")
    logits = model(tokens, padding_side="left")
    for i, r in enumerate(parts):
        assert torch.allclose(logits[i, -len(r) :], model(r[None])[0], atol=ATOL), i


@torch.no_grad()
def test_an_explicit_mask_wins_over_inference(model):
    # A row whose real tokens include the pad id: the caller's mask says they are real.
    parts = [torch.tensor([PAD, 5, 6, PAD]), torch.tensor([7, 8])]
    tokens = pad_rows(parts, "left")
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    logits = model(tokens, attention_mask=mask, past_kv_cache=new_cache(model, 2))
    alone = model(parts[0][None], attention_mask=torch.ones(1, 4, dtype=torch.long))[0]
    assert torch.allclose(logits[0], alone, atol=ATOL)


@torch.no_grad()
def test_without_a_tokenizer_nothing_is_inferred():
    # TL raises here (it needs a tokenizer to infer); kvlens takes every token as real.
    model = HookedTransformer.from_hf_model(make_hf_model("llama"))
    tokens = pad_rows(rows(6), "left")
    cached = model(tokens, past_kv_cache=new_cache(model, tokens.shape[0]))
    assert torch.allclose(cached, model(tokens, attention_mask=torch.ones_like(tokens)))


# Pad == BOS, pad == EOS --------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("use_cache", [False, True])
def test_pad_equal_to_bos_keeps_each_rows_bos_when_bos_is_prepended(use_cache):
    # GPT-2 style: BOS, EOS and pad are one token. TL keeps the last leading pad of each row
    # real, as its BOS, when BOS is prepended.
    model = HookedTransformer.from_hf_model(
        make_hf_model("gpt2"), tokenizer=fake_tokenizer(pad=PAD, bos=PAD)
    )
    model.tokenizer.padding_side = "left"
    assert model.cfg.default_prepend_bos
    parts = rows(7, first=PAD)
    tokens = pad_rows(parts, "left")
    cache = new_cache(model, len(parts)) if use_cache else None
    logits = model(tokens, past_kv_cache=cache)
    for i, r in enumerate(parts):
        alone = model(r[None], attention_mask=torch.ones(1, len(r), dtype=torch.long))[0]
        assert torch.allclose(logits[i, -len(r) :], alone, atol=ATOL), i
    # Without prepend_bos the BOS is one more leading pad (TL's rule), in a row alone too.
    no_bos = model(tokens, prepend_bos=False)
    for i, r in enumerate(parts):
        assert torch.allclose(no_bos[i, -len(r) + 1 :], model(r[None, 1:])[0], atol=ATOL), i


@torch.no_grad()
def test_a_tokenizer_without_bos_is_left_as_it_is():
    # Deliberate difference: TL's set_tokenizer would set BOS (and pad) to EOS, which then
    # triggers its pad == BOS rule. kvlens edits no special token: no BOS, no such rule.
    model = HookedTransformer.from_hf_model(
        make_hf_model("llama"), tokenizer=fake_tokenizer(bos=None)
    )
    assert model.tokenizer.bos_token_id is None and model.tokenizer.pad_token_id == PAD
    parts = rows(8)
    tokens = pad_rows(parts, "left")
    logits = model(tokens, padding_side="left", prepend_bos=True)
    for i, r in enumerate(parts):
        assert torch.allclose(logits[i, -len(r) :], model(r[None])[0], atol=ATOL), i


@pytest.fixture
def smol():
    """The tiny Llama with its own copy of SmolLM2's tokenizer (pad == EOS == 2), padding left."""
    model = tiny_llama_with_tokenizer()
    model.tokenizer = copy.deepcopy(smollm2_tokenizer())
    model.tokenizer.padding_side = "left"
    return model


@torch.no_grad()
@pytest.mark.parametrize("use_cache", [False, True])
def test_pad_equal_to_eos_left_padded_to_tokens(smol, use_cache):
    # The measured bug: SmolLM2 pads left with EOS, and the padded row differed from the row.
    texts = ["The cat sat on the", "Hi"]
    tokens = smol.to_tokens(texts)
    assert smol.tokenizer.pad_token_id == smol.tokenizer.eos_token_id == int(tokens[1, 0])
    cache = new_cache(smol, 2) if use_cache else None
    logits = smol(tokens, past_kv_cache=cache)
    for i, text in enumerate(texts):
        alone = smol(smol.to_tokens(text))[0]
        assert torch.allclose(logits[i, -alone.shape[0] :], alone, atol=ATOL), i


@torch.no_grad()
def test_text_input_is_masked_as_tokenized_not_guessed(smol):
    # Deliberate difference: TL would treat a final EOS of text as a trailing pad under a cache.
    smol.tokenizer.padding_side = "right"
    text = "Hello there<|im_end|>"
    tokens = smol.to_tokens(text)
    assert int(tokens[0, -1]) == smol.tokenizer.eos_token_id
    expected = smol(tokens, attention_mask=torch.ones_like(tokens))
    assert torch.allclose(smol(text, past_kv_cache=new_cache(smol, 1)), expected, atol=ATOL)
    cache = smol.prefill(text)
    assert bool(cache.previous_attention_mask.all())


@torch.no_grad()
def test_token_input_with_a_final_eos_under_a_cache_masks_it_as_tl(smol):
    # TL's rule, kept: under a cache, a trailing pad-id token counts as padding.
    smol.tokenizer.padding_side = "right"
    tokens = smol.to_tokens("Hello there<|im_end|>")
    cache = new_cache(smol, 1)
    smol(tokens, past_kv_cache=cache)
    assert cache.previous_attention_mask.tolist() == [[1] * (tokens.shape[1] - 1) + [0]]


def test_to_tokens_pads_right_by_default_as_tl():
    model = tiny_llama_with_tokenizer()
    assert model.tokenizer.padding_side == "right"
    tokens = model.to_tokens(["The cat sat on the", "Hi"])
    assert int(tokens[1, 0]) == model.tokenizer.encode("Hi")[0]
    assert int(tokens[1, -1]) == model.tokenizer.pad_token_id
    left = model.to_tokens(["The cat sat on the", "Hi"], padding_side="left")
    assert int(left[1, -1]) == model.tokenizer.encode("Hi")[0]


# The rule itself, against TransformerLens's own function --------------------------------------


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize(("bos", "prepend_bos"), [(5, True), (0, True), (0, False)])
def test_mask_rule_equals_transformer_lens(side, bos, prepend_bos):
    from transformer_lens.utils import get_attention_mask

    pad = 0
    gen = torch.Generator().manual_seed(8)
    # Few distinct ids, so pads turn up at both ends, in the middle, and fill whole rows.
    for width in (1, 2, 6):
        tokens = torch.randint(0, 3, (64, width), generator=gen)
        tokenizer = SimpleNamespace(pad_token_id=pad, bos_token_id=bos, padding_side=side)
        theirs = get_attention_mask(tokenizer, tokens, prepend_bos)
        keep_bos = prepend_bos and bos == pad
        ours = padding_mask_from_tokens(tokens, pad, side, keep_bos)
        assert ours.to(theirs.dtype).tolist() == theirs.tolist(), width


def test_mask_rule_examples():
    t = torch.tensor([[2, 2, 5, 2, 6], [5, 6, 2, 2, 2], [2, 2, 2, 2, 2]])
    assert padding_mask_from_tokens(t, 2, "left").int().tolist() == [
        [0, 0, 1, 1, 1],
        [1, 1, 1, 1, 1],
        [0, 0, 0, 0, 0],
    ]
    assert padding_mask_from_tokens(t, 2, "right").int().tolist() == [
        [1, 1, 1, 1, 1],
        [1, 1, 0, 0, 0],
        [0, 0, 0, 0, 0],
    ]
    assert padding_mask_from_tokens(t, 2, "left", keep_last_leading_pad=True).int().tolist() == [
        [0, 1, 1, 1, 1],
        [1, 1, 1, 1, 1],
        [0, 0, 0, 0, 1],
    ]
    with pytest.raises(ValueError, match="padding_side"):
        padding_mask_from_tokens(t, 2, "top")  # type: ignore[arg-type]


def test_default_padding_side_can_be_chosen_at_construction():
    tokenizer = copy.deepcopy(smollm2_tokenizer())
    model = HookedTransformer(
        tiny_llama_with_tokenizer().cfg, tokenizer=tokenizer, default_padding_side="left"
    )
    assert model.tokenizer is tokenizer and tokenizer.padding_side == "left"
    assert int(model.to_tokens(["The cat sat on the", "Hi"])[1, 0]) == tokenizer.pad_token_id
    with pytest.raises(ValueError, match="default_padding_side"):
        model.set_tokenizer(tokenizer, "top")  # type: ignore[arg-type]
