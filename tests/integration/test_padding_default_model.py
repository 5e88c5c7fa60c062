"""Padding on the real default model (SmolLM2-135M, whose tokenizer pads with EOS)."""

import pytest
import torch

import kvlens
from kvlens.cache import KeyValueCache

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "Hi"]


@pytest.fixture(scope="module")
def model():
    return kvlens.HookedTransformer.from_pretrained(progress=False)


def test_to_tokens_pads_right_as_transformer_lens(model):
    assert model.tokenizer.padding_side == "right"
    tokens = model.to_tokens(PROMPTS)
    assert int(tokens[1, -1]) == model.tokenizer.pad_token_id == model.tokenizer.eos_token_id


@pytest.mark.parametrize("side", ["left", "right"])
def test_greedy_rows_equal_each_prompt_alone(model, side):
    kw = dict(max_new_tokens=8, do_sample=False, stop_at_eos=False, verbose=False)
    batch = model.generate(PROMPTS, padding_side=side, **kw)
    assert batch == [model.generate(p, **kw) for p in PROMPTS]


@torch.no_grad()
@pytest.mark.parametrize("use_cache", [False, True])
def test_left_padded_tokens_without_a_mask_equal_each_row_alone(model, use_cache):
    tokens = model.to_tokens(PROMPTS, padding_side="left")
    cache = KeyValueCache.init_cache(model.cfg, None, 2) if use_cache else None
    logits = model(tokens, padding_side="left", past_kv_cache=cache)
    for i, prompt in enumerate(PROMPTS):
        alone = model(model.to_tokens(prompt))[0]
        assert (logits[i, -alone.shape[0] :] - alone).abs().max() < 1e-3, i
