"""``from_pretrained(..., quantized=True)`` (a GGUF file's own blocks) and ``quantize=...`` (any
fp32 checkpoint rounded at load): what is held, equal to the fp32 load, the arguments refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from tests.tiny_models import save_tiny_llama_folder
from tests.unit.loading.test_gguf_blocks import N_LAYERS, tiny_file

from kvlens.model import HookedTransformer
from kvlens.quantized import QuantizedMatrix

GREEDY = dict(max_new_tokens=8, do_sample=False, stop_at_eos=False, verbose=False)


def test_gguf_blocks_are_kept_and_run_as_the_fp32_load(tmp_path: Path) -> None:
    path = tiny_file(tmp_path / "tiny.gguf", tied=True)
    quantized = HookedTransformer.from_pretrained(path, quantized=True, progress=False)
    fp32 = HookedTransformer.from_pretrained_no_processing(path, progress=False)
    held = quantized.quantized_weights
    assert {m.fmt for m in held.values()} == {"q4_0", "q8_0"}
    assert held["unembed.W_U"].blocks is held["embed.W_E"].blocks
    assert all(f"blocks.{i}.mlp.W_out" not in held for i in range(N_LAYERS))  # F16 in the file
    assert quantized.dense_file_matrices == tuple(
        f"blk.{i}.ffn_down.weight (F16)" for i in range(N_LAYERS)
    )
    summary = quantized.quantization_summary()
    assert any("dequantized at load" in line and "ffn_down" in line for line in summary)
    steps = quantized.weight_processing  # only the step that writes no matrix
    assert steps.fold_value_biases and not (steps.fold_ln or steps.center_unembed)
    for name in ("W_Q", "W_K", "W_V", "W_O", "W_gate", "W_in", "W_out", "W_E", "W_U"):
        assert torch.equal(getattr(quantized, name), getattr(fp32, name)), name
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, quantized.cfg.d_vocab, (2, 9), generator=gen)
    torch.testing.assert_close(quantized(tokens), fp32(tokens), rtol=1e-5, atol=1e-5)
    assert torch.equal(quantized.generate(tokens, **GREEDY), fp32.generate(tokens, **GREEDY))


def test_processing_steps_default_off_and_are_refused_with_quantized(tmp_path: Path) -> None:
    path = tiny_file(tmp_path / "tiny.gguf", tied=False)
    with pytest.raises(ValueError, match="fold_ln would rewrite the weight matrices"):
        HookedTransformer.from_pretrained(path, quantized=True, fold_ln=True, progress=False)
    model = HookedTransformer.from_pretrained_no_processing(path, quantized=True, progress=False)
    assert model.quantized_weights["unembed.W_U"].fmt == "q4_1"


def test_quantize_at_load_processes_first_then_rounds(tmp_path: Path) -> None:
    folder = save_tiny_llama_folder(tmp_path / "tiny")
    fp32 = HookedTransformer.from_pretrained(folder, progress=False)
    model = HookedTransformer.from_pretrained(folder, quantize="q8_0", progress=False)
    assert model.weight_processing == fp32.weight_processing and fp32.weight_processing.fold_ln
    held = model.quantized_weights
    assert len(held) == 4 * model.cfg.n_layers + 2 and {m.fmt for m in held.values()} == {"q8_0"}
    want = QuantizedMatrix.quantize(fp32.blocks[0].attn.W_QKV.T, "q8_0").dequantize().T
    assert torch.equal(model.blocks[0].attn.W_QKV, want)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.cfg.d_vocab, (1, 7), generator=gen)
    log_probs = model(tokens).log_softmax(-1)
    torch.testing.assert_close(log_probs, fp32(tokens).log_softmax(-1), rtol=0, atol=0.05)


def test_f16_gguf_can_be_quantized_at_load(tmp_path: Path) -> None:
    f16 = {name: Q.F16 for name in ("attn_q.weight", "attn_k.weight", "attn_v.weight")}
    f16 |= {name: Q.F16 for name in ("attn_output.weight", "ffn_gate.weight", "ffn_up.weight")}
    path = tiny_file(tmp_path / "f16.gguf", tied=True, changes=f16, embed=Q.F16)
    model = HookedTransformer.from_pretrained_no_processing(path, quantize="q8_0", progress=False)
    assert {m.fmt for m in model.quantized_weights.values()} == {"q8_0"}
    held = model.quantized_weights
    assert held["unembed.W_U"].blocks is held["embed.W_E"].blocks


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(quantized=True, quantize="q8_0"), "not both"),
        (dict(quantize="q5_1"), r"quantize must be one of \('q4_0', 'q4_1', 'q8_0'\)"),
        (dict(quantized=True, dtype="bf16"), "compute in float32 on the CPU, on one device"),
        (dict(quantized=True, device="meta"), "compute in float32 on the CPU, on one device"),
    ],
)
def test_impossible_arguments_are_refused(tmp_path: Path, options: dict, message: str) -> None:
    path = tiny_file(tmp_path / "tiny.gguf", tied=True)
    with pytest.raises(ValueError, match=message):
        HookedTransformer.from_pretrained_no_processing(path, progress=False, **options)


def test_quantized_needs_a_gguf_model(tmp_path: Path) -> None:
    folder = save_tiny_llama_folder(tmp_path / "tiny")
    with pytest.raises(ValueError, match="is not a GGUF model; give quantize='q8_0'"):
        HookedTransformer.from_pretrained_no_processing(folder, quantized=True, progress=False)
