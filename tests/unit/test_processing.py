"""Weight processing on tiny models: the function kept, biases created, the native layer used."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from kvlens import HookedTransformer, KeyValueCache, ModelConfig
from kvlens.kernels import build
from kvlens.processing import WeightProcessing

COMMON: dict[str, Any] = dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=48, n_ctx=64)
FAMILIES: dict[str, dict[str, Any]] = {
    # LayerNorm, learned positions, no unembedding bias: fold_ln must create b_U.
    "gpt2": dict(act_fn="gelu_new", normalization_type="LN"),
    "neox": dict(
        act_fn="gelu", normalization_type="LN", positional_embedding_type="rotary",
        rotary_dim=4, parallel_attn_mlp=True,
    ),
    "llama": dict(
        n_key_value_heads=2, act_fn="silu", normalization_type="RMS",
        positional_embedding_type="rotary", gated_mlp=True, attn_qkv_bias=False,
        attn_out_bias=False, mlp_bias=False,
    ),
    # Qwen2: q, k, v biases but no output bias: fold_value_biases must create b_O.
    "qwen2": dict(
        n_key_value_heads=2, act_fn="silu", normalization_type="RMS",
        positional_embedding_type="rotary", gated_mlp=True, attn_qkv_bias=True,
        attn_out_bias=False, mlp_bias=False,
    ),
}  # fmt: skip


def tiny(family: str, d_vocab: int = 50, **changes: Any) -> HookedTransformer:
    """A model of ``family`` with every parameter (norm scales and biases too) random."""
    cfg = ModelConfig(**COMMON, **FAMILIES[family], d_vocab=d_vocab).replace(**changes)
    model = HookedTransformer(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if name.endswith(".w"):
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_((0.2 if param.ndim == 1 else 0.15) * noise)
        model.unembed.W_U.mul_(10.0)  # greedy choices far from ties
    return model


def processed(model: HookedTransformer, **flags: bool) -> HookedTransformer:
    copied = copy.deepcopy(model)
    copied.process_weights_(**flags)
    return copied


def tokens(d_vocab: int = 50, batch: int = 2, pos: int = 10, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, d_vocab, (batch, pos), generator=gen)


def decode_steps(model: HookedTransformer, toks: torch.Tensor, prompt: int = 4) -> torch.Tensor:
    """Last-position logits of a prefill of ``prompt`` tokens, then one per decode step."""
    cache = KeyValueCache.init_cache(model.cfg, None, toks.shape[0])
    with torch.no_grad():
        out = [model(toks[:, :prompt], past_kv_cache=cache)[:, -1]]
        for i in range(prompt, toks.shape[1]):
            out.append(model(toks[:, i : i + 1], past_kv_cache=cache)[:, -1])
    return torch.stack(out, 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_processing_keeps_log_probs(family: str) -> None:
    model = tiny(family)
    after = processed(model)
    toks = tokens()
    with torch.no_grad():
        before_lp, after_lp = model(toks).log_softmax(-1), after(toks).log_softmax(-1)
    torch.testing.assert_close(after_lp, before_lp, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_processed_cached_equals_uncached_and_runs_natively(family: str) -> None:
    model = processed(tiny(family))
    toks = tokens()
    with torch.no_grad():
        full = model(toks)[:, 3:]
    cached = decode_steps(model, toks)
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-5)
    if not build.available():
        pytest.skip("native kernels not built here")
    assert all(block.decode_plan is not None for block in model.blocks), [
        block.decode_plan_reason for block in model.blocks
    ]
    # A hook that changes nothing makes every block run op by op.
    hooks = [(f"blocks.{i}.hook_attn_out", lambda x, hook: x) for i in range(2)]
    with model.hooks(fwd_hooks=hooks):
        assert all(block.decode_plan is None for block in model.blocks)
        op_by_op = decode_steps(model, toks)
    torch.testing.assert_close(cached, op_by_op)


def test_layer_norm_folding_creates_the_biases_it_writes() -> None:
    model = tiny("gpt2", unembed_bias=False, attn_qkv_bias=False, mlp_bias=False)
    assert model.unembed.b_U is None and model.blocks[0].attn.b_QKV is None
    after = processed(model, center_unembed=False)
    assert after.cfg.unembed_bias and after.cfg.attn_qkv_bias and after.cfg.mlp_bias
    assert after.unembed.b_U is not None and bool(after.unembed.b_U.any())
    assert after.blocks[0].attn.b_QKV is not None and after.blocks[0].mlp.b_in is not None
    ln_b = model.ln_final.b.detach()
    torch.testing.assert_close(after.unembed.b_U, ln_b @ model.unembed.W_U)


def test_value_biases_fold_into_a_new_output_bias() -> None:
    model = tiny("qwen2")
    after = processed(model, fold_ln=False, center_unembed=False)
    assert after.cfg.attn_out_bias and after.blocks[0].attn.b_O is not None
    assert not after.blocks[0].attn.b_V.any()
    attn = model.blocks[0].attn
    expected = (attn.b_V[:, :, None] * attn.W_O).sum((0, 1))
    torch.testing.assert_close(after.blocks[0].attn.b_O, expected)


def test_rms_models_get_no_new_biases_and_no_centering() -> None:
    model = tiny("llama")
    after = processed(model)
    assert after.cfg == model.cfg  # RMS, no biases: nothing to create
    assert after.blocks[0].attn.b_O is None and after.unembed.b_U is None
    assert after.weight_processing == WeightProcessing(
        fold_ln=True, center_unembed=True, fold_value_biases=True
    )  # center_writing_weights needs LayerNorm: skipped
    torch.testing.assert_close(after.W_E, model.W_E)  # not centered
    torch.testing.assert_close(after.W_U.mean(-1), torch.zeros(32), atol=1e-5, rtol=0)


def test_center_unembed_is_skipped_under_a_logit_soft_cap() -> None:
    model = tiny("llama", output_logits_soft_cap=5.0)
    after = processed(model)
    assert not after.weight_processing.center_unembed
    toks = tokens()
    with torch.no_grad():
        torch.testing.assert_close(
            after(toks).log_softmax(-1), model(toks).log_softmax(-1), atol=1e-4, rtol=1e-5
        )


def test_processing_changes_the_fingerprint_and_refuses_old_caches() -> None:
    model = tiny("gpt2")
    before = model.weights_fingerprint()
    cache = model.prefill(tokens(batch=1, pos=4))
    model.process_weights_()
    assert model.weights_fingerprint() != before
    with pytest.raises(ValueError):
        model(tokens(batch=1, pos=1), past_kv_cache=cache)


def test_processing_twice_records_both_and_refolds_nothing() -> None:
    model = processed(tiny("gpt2"), center_unembed=False)
    toks = tokens()
    with torch.no_grad():
        once = model(toks)
    model.process_weights_(fold_ln=True, center_writing_weights=False, center_unembed=True)
    assert model.weight_processing == WeightProcessing(
        fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True
    )
    with torch.no_grad():
        twice = model(toks)
    torch.testing.assert_close(twice.log_softmax(-1), once.log_softmax(-1), atol=1e-4, rtol=1e-5)


def test_gemma2_post_norms_stay_and_log_probs_keep() -> None:
    """TL folds only the norms before attention and the MLP; Gemma 2's post-norms stay."""
    model = tiny(
        "llama",
        act_fn="gelu_pytorch_tanh",
        use_normalization_before_and_after=True,
        attn_scores_soft_cap=50.0,
        output_logits_soft_cap=30.0,
    )
    after = processed(model)
    post = after.blocks[0].ln1_post.w
    torch.testing.assert_close(post, model.blocks[0].ln1_post.w)
    assert not torch.equal(post, torch.ones_like(post))
    toks = tokens()
    with torch.no_grad():
        torch.testing.assert_close(
            after(toks).log_softmax(-1), model(toks).log_softmax(-1), atol=1e-4, rtol=1e-5
        )
    torch.testing.assert_close(decode_steps(after, toks), after(toks)[:, 3:], atol=1e-4, rtol=1e-5)
