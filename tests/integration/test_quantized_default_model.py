"""The default model on its own Q4_1/Q8_0 blocks (``quantized=True``, the CLI's default for GGUF
models): the same greedy tokens as the fp32 load over 2,048 generated tokens, logits within
the bound the order of summation explains, the fused layer with a steering hook, the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.integration.test_cli import run

import kvlens
from kvlens.kernels import build

pytestmark = pytest.mark.slow

PROMPTS = [
    "The history of the printing press",
    "Write a short poem about the sea.",
    "def fibonacci(n):",
    "In 1969, the first humans",
    "Explain why the sky is blue.",
    "The recipe for bread calls for",
    "Once upon a time, in a small village,",
    "The three laws of motion are",
]
NEW_TOKENS = 256  # x 8 prompts: 2,048 generated tokens
# Largest difference of a generated position's logits, quantized path vs fp32 path of the same
# file (the blocks dequantize exactly; only the order of additions differs). Measured 6.8e-5 on
# these prompts (logits up to 46 in magnitude), 2026-12-02; the bound leaves 15x room.
LOGIT_BOUND = 1e-3
GREEDY = dict(do_sample=False, stop_at_eos=False, verbose=False, padding_side="left")


@pytest.fixture(scope="module")
def quantized() -> kvlens.HookedTransformer:
    return kvlens.HookedTransformer.from_pretrained(quantized=True, progress=False)


@pytest.fixture(scope="module")
def fp32() -> kvlens.HookedTransformer:
    return kvlens.HookedTransformer.from_pretrained_no_processing(progress=False)


def test_the_file_blocks_are_held(quantized) -> None:
    assert quantized.quantization_summary() == [
        "q4_1: 120 matrices, 66.4 MB",
        "q8_0: 1 matrices, 30.1 MB",
    ]
    held = quantized.quantized_weights
    assert held["unembed.W_U"].blocks is held["embed.W_E"].blocks
    if build.available():
        assert all(block.decode_plan_reason is None for block in quantized.blocks)


def test_greedy_tokens_and_logits_equal_the_fp32_path(quantized, fp32) -> None:
    tokens = quantized.to_tokens(PROMPTS, padding_side="left")
    options = dict(GREEDY, max_new_tokens=NEW_TOKENS, output_logits=True)
    got = quantized.generate(tokens, **options)
    want = fp32.generate(tokens, **options)
    assert got.sequences.shape == (len(PROMPTS), tokens.shape[1] + NEW_TOKENS)
    assert torch.equal(got.sequences, want.sequences)
    worst = max((a - b).abs().max().item() for a, b in zip(got.logits, want.logits, strict=True))
    assert worst <= LOGIT_BOUND


def test_steering_keeps_the_fused_layer_and_equals_uncached(quantized) -> None:
    tokens = quantized.to_tokens(PROMPTS[:2], padding_side="left")
    vector = 4.0 * torch.randn(quantized.cfg.d_model, generator=torch.Generator().manual_seed(0))
    hooks = [("blocks.15.hook_resid_post", lambda x, hook: x + vector)]
    options = dict(GREEDY, max_new_tokens=16)
    plain = quantized.generate(tokens, **options)
    with quantized.hooks(fwd_hooks=hooks):
        if build.available():
            assert quantized.blocks[15].decode_plan_reason is None
        cached = quantized.generate(tokens, **options)
        uncached = quantized.generate(tokens, use_past_kv_cache=False, **options)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, plain)


def test_cli_runs_gguf_models_on_their_blocks_unless_told_not_to(capsys) -> None:
    code, out, _ = run(["info", "--quiet"], capsys)
    assert code == 0
    assert "quantized weights:\n  q4_1: 120 matrices, 66.4 MB\n  q8_0: 1 matrices" in out
    assert "parameters: 162,826,560" in out  # as the fp32 model counts them
    code, out, _ = run(["info", "--quiet", "--no-quantized"], capsys)
    assert code == 0 and "quantized weights: none (fp32)" in out
    code, out, _ = run(
        ["generate", "The capital of France is", "--max-new-tokens", "4", "--quiet"], capsys
    )
    assert code == 0 and out.startswith("The capital of France is")


def test_q8_0_at_load_keeps_perplexity_within_one_percent(fp32) -> None:
    """``quantize="q8_0"`` on the default model's fp32 weights, on a fixed text shipped here.

    Measured 2026-12-02 (``benchmarks/bench_perplexity.py``): 30.380 fp32, 30.454 q8_0 (+0.24%),
    top-1 agreement 98.4% over 1,129 positions."""
    q8 = kvlens.HookedTransformer.from_pretrained_no_processing(quantize="q8_0", progress=False)
    assert q8.quantization_summary() == ["q8_0: 121 matrices, 142.9 MB"]
    tokens = fp32.to_tokens((Path(__file__).parents[1] / "data" / "perplexity.txt").read_text())
    assert tokens.shape[1] > 1000
    with torch.inference_mode():
        want, got = fp32(tokens), q8(tokens)
    ratio = perplexity(got, tokens) / perplexity(want, tokens)
    assert 0.99 < ratio < 1.01
    agreement = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    assert agreement > 0.95


def perplexity(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    log_probs = logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None])
    return log_probs.mean().neg().exp().item()
