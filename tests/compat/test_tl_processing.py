"""Weight processing (``process_weights_``): the same weights, logits and activations as TL 2.18."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import pytest
import torch
from tests.compat.pairs import FAMILIES, Pair, assert_same, model_pair, random_tokens

from kvlens.model import HookedTransformer

FLAGS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")
COMBOS = [dict(zip(FLAGS, values, strict=True)) for values in itertools.product((0, 1), repeat=4)]
WEIGHTS = (
    "W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O",
    "W_in", "W_out", "b_in", "b_out", "W_gate", "W_U", "b_U", "W_E",
)  # fmt: skip


def _processed(family: str, **flags: Any) -> tuple[HookedTransformer, Any]:
    """Copies of ``family``'s pair, each processed by its own library with ``flags``."""
    pair = model_pair(family)
    kv, tl = copy.deepcopy(pair.kv), copy.deepcopy(pair.tl)
    flags = {name: bool(value) for name, value in flags.items()}
    kv.process_weights_(**flags)
    fold_value_biases = flags.pop("fold_value_biases", True)
    if not fold_value_biases:  # TL's process_weights_ always folds them
        tl.fold_value_biases = lambda state_dict: state_dict
    tl.process_weights_(**flags)
    # TL's process_weights_ swaps in LNPre/RMSNormPre modules without registering their hooks
    # (from_pretrained builds them from the start, so they are registered there).
    tl.setup()
    return kv, tl


def _assert_weights(kv: HookedTransformer, tl: Any) -> None:
    for name in WEIGHTS:
        kv_w, tl_w = getattr(kv, name), getattr(tl, name)
        if tl_w is None:  # W_gate of a plain MLP
            assert kv_w is None, name
            continue
        assert_same(kv_w, tl_w, f"model.{name}")
    if kv.cfg.positional_embedding_type == "standard":
        assert_same(kv.W_pos, tl.W_pos, "model.W_pos")


@pytest.mark.parametrize("flags", COMBOS, ids=lambda f: "".join(str(v) for v in f.values()))
@pytest.mark.parametrize("family", FAMILIES)
def test_process_weights_equals_tl(family: str, flags: dict[str, int]) -> None:
    kv, tl = _processed(family, **flags)
    _assert_weights(kv, tl)
    tokens = random_tokens(3, 2, 9)
    kv_logits, kv_cache = kv.run_with_cache(tokens)
    tl_logits, tl_cache = tl.run_with_cache(tokens)
    assert_same(kv_logits, tl_logits, "logits")
    assert set(kv_cache.keys()) == set(tl_cache.keys())
    for name in kv_cache:
        assert_same(kv_cache[name], tl_cache[name], name)


def test_processing_keeps_log_probs(pair: Pair) -> None:
    """Every step together leaves log-probabilities as they were (up to float rounding)."""
    kv = copy.deepcopy(pair.kv)
    kv.process_weights_()
    tokens = random_tokens(4, 2, 9)
    before = pair.kv(tokens).log_softmax(-1)
    assert_same(kv(tokens).log_softmax(-1), before, "log-probs")


def test_refactor_factored_attn_matrices_equals_tl() -> None:
    """Only learned-position, multi-head models can be refactored (TL asserts the same)."""
    kv, tl = _processed("gpt2", refactor_factored_attn_matrices=True)
    _assert_weights(kv, tl)
    tokens = random_tokens(5, 2, 9)
    assert_same(kv(tokens), tl(tokens), "logits")
    for family in ("neox", "llama"):
        with pytest.raises(ValueError, match="refactor_factored_attn_matrices"):
            copy.deepcopy(model_pair(family).kv).process_weights_(
                refactor_factored_attn_matrices=True
            )


def test_folded_norms_compute_identity_scale(pair: Pair) -> None:
    """kvlens keeps the folded norms with ``w = 1`` (``b = 0``) where TL has LN/RMSNormPre."""
    kv, tl = _processed(pair.family, fold_ln=True)
    norm_type = pair.kv.cfg.normalization_type
    assert tl.cfg.normalization_type == f"{norm_type}Pre"
    assert kv.cfg.normalization_type == norm_type
    assert kv.weight_processing.fold_ln
    for norm in (kv.blocks[0].ln1, kv.blocks[1].ln2, kv.ln_final):
        assert torch.equal(norm.w, torch.ones_like(norm.w))
        if norm_type == "LN":
            assert torch.equal(norm.b, torch.zeros_like(norm.b))
