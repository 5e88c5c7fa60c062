"""A model holding its weight matrices as ggml blocks (``quantize_``): the same model as its exact
fp32 dequantization, every path (fused decode layer, op by op, prefill tiles, hooks, autograd),
weight names readable as fp32 and refusing writes, processing refused, the fingerprint."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from tests.helpers import FAMILIES, make_hf_model, tokens_for
from torch import Tensor, nn

from kvlens.cache.cache import KeyValueCache
from kvlens.components.quantizable import QuantizedWeightError
from kvlens.kernels import build
from kvlens.model import HookedTransformer
from kvlens.quantized import QuantizedMatrix

FAMS = (*FAMILIES, "gemma2")
# d_mlp 64 (a multiple of the 32-weight block) where the tiny default (48) is not.
WIDE_MLP = {"llama": 64, "mistral": 64, "qwen2": 64, "gemma2": 64}


@functools.cache
def pair(family: str, fmt: str = "q8_0") -> tuple[HookedTransformer, HookedTransformer]:
    """``(quantized, fp32)``: a tiny model quantized to ``fmt``, and the fp32 model holding the
    exact dequantization of its blocks."""
    overrides = {"intermediate_size": WIDE_MLP[family]} if family in WIDE_MLP else {}
    fp32 = HookedTransformer.from_hf_model(make_hf_model(family, **overrides)).eval()
    with torch.no_grad():
        fp32.unembed.W_U.mul_(20.0)  # greedy choices far from ties
    quantized = copy.deepcopy(fp32)
    quantized.quantize_(fmt)
    dense = copy.deepcopy(quantized)
    dense.dequantize_()
    return quantized, dense


def same(a: Tensor, b: Tensor) -> None:
    """Equal up to the order of the additions of the products (fp32)."""
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMS)
def test_every_matrix_is_held_as_blocks(family: str) -> None:
    quantized, dense = pair(family)
    held = quantized.quantized_weights
    n = quantized.cfg.n_layers
    assert len(held) == 4 * n + 2 and all(isinstance(m, QuantizedMatrix) for m in held.values())
    assert not dense.is_quantized and quantized.is_quantized
    assert not any(name.endswith(("W_QKV", "W_U")) for name, _ in quantized.named_parameters())
    assert quantized.state_dict()["blocks.0.attn.W_QKV_blocks"].dtype == torch.uint8
    fp32_bytes = sum(p.numel() * 4 for p in dense.parameters())
    held_bytes = sum(p.numel() * p.element_size() for p in quantized.state_dict().values())
    assert held_bytes < 0.4 * fp32_bytes


@pytest.mark.parametrize("family", FAMS)
def test_forward_equals_the_dequantized_model(family: str) -> None:
    quantized, dense = pair(family)
    for pos in (5, 40):  # on the blocks (few rows), and in dequantized tiles (more than 32)
        tokens = tokens_for(pos, 2, pos)
        same(quantized(tokens), dense(tokens))


@pytest.mark.skipif(not build.available(), reason="native kernels not built here")
@pytest.mark.parametrize("family", FAMS)
def test_decode_step_fused_equals_op_by_op_bitwise(family: str) -> None:
    quantized, dense = pair(family)
    fused = [block.decode_plan_reason for block in quantized.blocks]
    assert fused == [block.decode_plan_reason for block in dense.blocks]
    tokens = tokens_for(3, 2, 7)

    def step(hooked: bool) -> Tensor:
        cache = KeyValueCache.init_cache(quantized.cfg, "cpu", batch_size=2)
        quantized(tokens[:, :6], past_kv_cache=cache)
        hooks = [(f"blocks.{i}.attn.hook_z", lambda z, hook: z) for i in range(2)]
        with quantized.hooks(fwd_hooks=hooks if hooked else []):
            return quantized(tokens[:, 6:], past_kv_cache=cache)

    assert torch.equal(step(False), step(True))
    cache = KeyValueCache.init_cache(dense.cfg, "cpu", batch_size=2)
    dense(tokens[:, :6], past_kv_cache=cache)
    same(step(False), dense(tokens[:, 6:], past_kv_cache=cache))


@pytest.mark.parametrize("family", FAMS)
@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q8_0"])
def test_greedy_generation_equals_the_dequantized_model(family: str, fmt: str) -> None:
    quantized, dense = pair(family, fmt)
    prompt = tokens_for(11, 2, 6)
    options = dict(max_new_tokens=12, do_sample=False, stop_at_eos=False, verbose=False)
    out = quantized.generate(prompt, **options)
    assert torch.equal(out, dense.generate(prompt, **options))
    assert torch.equal(out, quantized.generate(prompt, use_past_kv_cache=False, **options))


def test_hooks_see_the_activations_and_an_identity_hook_changes_nothing() -> None:
    quantized, dense = pair("llama")
    tokens = tokens_for(5, 2, 9)
    logits, cache = quantized.run_with_cache(tokens)
    _, want = dense.run_with_cache(tokens)
    assert set(cache.keys()) == set(want.keys())
    for name in ("blocks.1.attn.hook_q", "blocks.0.mlp.hook_post", "blocks.1.hook_resid_post"):
        same(cache[name], want[name])
    everywhere = [(name, lambda x, hook: x) for name in cache]
    assert torch.equal(quantized.run_with_hooks(tokens, fwd_hooks=everywhere), logits)


def test_gradients_flow_through_the_blocks_as_through_fp32() -> None:
    quantized, dense = pair("llama")
    tokens = tokens_for(8, 2, 40)  # more than 32 rows: dequantized tiles

    def input_grad(model: HookedTransformer, pos: int) -> Tensor:
        embeds = model.embed(tokens[:, :pos]).detach().requires_grad_()
        model(embeds, tokens=tokens[:, :pos], return_type="loss").backward()
        assert embeds.grad is not None
        return embeds.grad

    for pos in (6, 40):
        same(input_grad(quantized, pos), input_grad(dense, pos))


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_weight_names_read_as_the_fp32_weights(family: str) -> None:
    quantized, dense = pair(family)
    for name in ("W_Q", "W_K", "W_V", "W_O", "W_in", "W_out", "W_U", "W_E", "b_U"):
        assert torch.equal(getattr(quantized, name), getattr(dense, name)), name
    assert torch.equal(quantized.blocks[1].attn.W_QKV, dense.blocks[1].attn.W_QKV)
    assert torch.equal(quantized.OV.AB, dense.OV.AB)
    assert torch.equal(quantized.accumulated_bias(2), dense.accumulated_bias(2))


def test_writes_are_refused_and_change_nothing() -> None:
    quantized, _ = pair("llama")
    tokens = tokens_for(2, 1, 5)
    before = quantized(tokens)
    attn = quantized.blocks[0].attn
    writes = [
        lambda: attn.W_Q.__setitem__(0, 0.0),
        lambda: attn.W_O[1].add_(1.0),
        lambda: attn.W_QKV.zero_(),
        lambda: nn.init.normal_(quantized.blocks[1].mlp.W_out),
        lambda: quantized.W_U.mul_(2.0),
        lambda: setattr(attn, "W_QKV", nn.Parameter(torch.zeros(32, 64))),
        lambda: setattr(quantized.embed.W_E, "data", torch.zeros(1)),
    ]
    for write in writes:
        with pytest.raises(QuantizedWeightError, match=r"quantized blocks.*fp32 model"):
            write()
    with pytest.raises(QuantizedWeightError, match=r"blocks\.0\.attn\.W_QKV"):
        attn._W_K[0] += 1.0  # a view of W_QKV
    assert torch.equal(quantized(tokens), before)
    edited = quantized.W_Q * 2  # computing with a read is fine
    edited += 1.0
    assert torch.equal(quantized(tokens), before)


def test_processing_that_rewrites_matrices_is_refused_before_any_change() -> None:
    quantized, _ = pair("gpt2")
    model = copy.deepcopy(quantized)
    tokens = tokens_for(4, 1, 6)
    before = model(tokens)
    with pytest.raises(ValueError, match="quantized blocks, which processing would rewrite"):
        model.process_weights_(fold_ln=True)
    assert torch.equal(model(tokens), before)
    assert model.weight_processing == quantized.weight_processing
    model.process_weights_(
        fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=True
    )  # writes biases only
    same(model(tokens), before)


def test_quantize_refuses_a_second_time_and_unknown_formats() -> None:
    quantized, _ = pair("llama")
    with pytest.raises(ValueError, match="already holds quantized weights"):
        copy.deepcopy(quantized).quantize_("q8_0")
    with pytest.raises(ValueError, match=r"fmt must be one of .*q4_0.*got 'q3_k'"):
        HookedTransformer.from_hf_model(make_hf_model("llama")).quantize_("q3_k")


def test_a_matrix_whose_width_is_not_a_multiple_of_32_stays_fp32() -> None:
    model = HookedTransformer.from_hf_model(make_hf_model("llama"))  # d_mlp 48
    model.quantize_("q8_0")
    held = model.quantized_weights
    assert "blocks.0.mlp.W_out" not in held and "blocks.0.mlp.W_gate_in" in held
    assert any("blocks.0.mlp.W_out" in line for line in model.quantization_summary())
    dense = copy.deepcopy(model)
    dense.dequantize_()
    tokens = tokens_for(6, 2, 5)
    same(model(tokens), dense(tokens))
    if build.available():
        assert all(block.decode_plan_reason is None for block in model.blocks)


def test_a_tied_unembedding_shares_the_embedding_blocks() -> None:
    model = HookedTransformer.from_hf_model(make_hf_model("qwen2", intermediate_size=64))
    model.quantize_("q4_0")
    held = model.quantized_weights
    assert held["unembed.W_U"].blocks is held["embed.W_E"].blocks
    assert any(line.startswith("q4_0: 9 matrices") for line in model.quantization_summary())
    with pytest.raises(IndexError, match=r"row indices must be in \[0, 97\), got 1\.\.97"):
        model.embed(torch.tensor([[1, 97]]))


def test_fingerprint_tells_quantized_from_fp32_and_caches_follow_it() -> None:
    quantized, dense = pair("llama")
    assert quantized.weights_fingerprint() != dense.weights_fingerprint()
    cache = KeyValueCache.init_cache(dense.cfg, "cpu", batch_size=1)
    dense(tokens_for(1, 1, 4), past_kv_cache=cache)
    with pytest.raises(ValueError, match="fingerprint"):
        quantized(tokens_for(1, 1, 1), past_kv_cache=cache)


def test_state_dict_round_trip_between_quantized_models() -> None:
    quantized, _ = pair("pythia")
    other = HookedTransformer.from_hf_model(make_hf_model("pythia", seed=1))
    other.quantize_("q8_0")
    tokens = tokens_for(9, 1, 6)
    assert not torch.equal(other(tokens), quantized(tokens))
    other.load_state_dict(quantized.state_dict())
    assert torch.equal(other(tokens), quantized(tokens))


def test_without_native_kernels_torch_computes_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """No library (no compiler, or KVLENS_NATIVE=0): the blocks are dequantized by gguf's
    reference and multiplied by torch, the same model."""
    quantized, dense = pair("llama")
    tokens = tokens_for(12, 2, 6)
    options = dict(max_new_tokens=6, do_sample=False, stop_at_eos=False, verbose=False)
    want = quantized.generate(tokens, **options)
    logits = quantized(tokens)
    monkeypatch.setitem(build._state, "lib", None)
    assert torch.equal(quantized.generate(tokens, **options), want)
    same(quantized(tokens), logits)
    assert torch.equal(quantized.blocks[0].attn.W_QKV, dense.blocks[0].attn.W_QKV)


def test_casts_and_moves_the_blocks_cannot_follow_are_refused_before_any_change() -> None:
    quantized, _ = pair("gpt2")
    model = copy.deepcopy(quantized)
    tokens = tokens_for(3, 1, 5)
    before = model(tokens)
    for cast in (model.half, model.bfloat16, lambda: model.to("meta")):
        with pytest.raises(ValueError, match=r"(compute in float32|stay uint8) on the CPU"):
            cast()
    assert model.cfg.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    model.to("cpu").float()
    assert torch.equal(model(tokens), before)


def test_load_state_dict_reaches_every_product_in_place_or_assigned() -> None:
    source, _ = pair("llama")
    tokens = tokens_for(13, 2, 6)
    want = source(tokens)
    for assign in (False, True):
        model = HookedTransformer.from_hf_model(
            make_hf_model("llama", seed=2, intermediate_size=64)
        )
        model.quantize_("q8_0")
        model(tokens)  # plans built on the old blocks
        model.load_state_dict(copy.deepcopy(source.state_dict()), assign=assign)
        assert torch.equal(model(tokens), want)
        assert torch.equal(model.blocks[0].attn.W_QKV, source.blocks[0].attn.W_QKV)
        options = dict(max_new_tokens=5, do_sample=False, stop_at_eos=False, verbose=False)
        assert torch.equal(model.generate(tokens, **options), source.generate(tokens, **options))


def test_more_writes_are_refused() -> None:
    quantized, _ = pair("llama")
    w = quantized.blocks[0].mlp.W_out
    for write in (
        lambda: torch.nn.functional.relu(w, inplace=True),
        lambda: w.requires_grad_(True),  # a gradient would never reach the blocks
        lambda: torch.max(torch.ones(3, 4), 0, out=(w[:1, 0], torch.zeros(1, dtype=torch.long))),
    ):
        with pytest.raises(QuantizedWeightError):
            write()


def test_bad_models_and_casts_for_quantizing_are_refused() -> None:
    bf16 = HookedTransformer.from_hf_model(make_hf_model("llama"), dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"float32 on the CPU.*dtype=torch\.bfloat16"):
        bf16.quantize_("q8_0")
    assert not bf16.is_quantized
    quantized = copy.deepcopy(pair("llama")[0])
    with pytest.raises(ValueError, match="stay uint8 on the CPU"):
        quantized.type(torch.float32)
    assert quantized.state_dict()["blocks.0.attn.W_QKV_blocks"].dtype == torch.uint8
