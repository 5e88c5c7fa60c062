"""quantized_state_dict: a GGUF file's Q4_0/Q4_1/Q8_0 matrices kept as blocks, every value the
fp32 loader's (the default model, and tiny files written with gguf.GGUFWriter)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from tests.unit.loading.test_gguf import (
    N_HEADS,
    N_KV,
    N_LAYERS,
    hf_tensors,
    llama_cpp_permute,
    write_gguf,
)
from torch import Tensor

from kvlens.loading.gguf import default_gguf_path
from kvlens.loading.gguf_blocks import QuantizedStateDict, quantized_state_dict
from kvlens.model import HookedTransformer
from kvlens.quantized import QuantizedMatrix

# Names whose blocks are kvlens's parameter itself; every other block matrix is its transpose.
UNTRANSPOSED = {"embed.W_E"}


def same_bits(a: Tensor, b: Tensor) -> bool:
    """Bitwise equality (the sign of zero included)."""
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def assert_equals_fp32(state: QuantizedStateDict, fp32: dict[str, Tensor]) -> None:
    """Every entry is the fp32 loader's parameter, bit for bit, in the documented orientation."""
    assert set(state) == set(fp32)
    for name, value in state.items():
        if isinstance(value, QuantizedMatrix):
            exact = value.dequantize()
            want = fp32[name] if name in UNTRANSPOSED else fp32[name].T
            assert same_bits(exact, want), name
        else:
            assert value.dtype == fp32[name].dtype and same_bits(value, fp32[name]), name


def stored_bytes(state: QuantizedStateDict) -> tuple[int, int]:
    """(block bytes, dense bytes), each object counted once (a tied W_U is W_E)."""
    unique = {id(v): v for v in state.values()}.values()
    blocks = sum(v.nbytes for v in unique if isinstance(v, QuantizedMatrix))
    dense = sum(v.numel() * v.element_size() for v in unique if isinstance(v, Tensor))
    return blocks, dense


def fp32_state(path: Path) -> dict[str, Tensor]:
    model = HookedTransformer.from_pretrained_no_processing(path, progress=False)
    return model.state_dict()


# The default model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default() -> tuple[QuantizedStateDict, list[str], dict[str, Tensor], int]:
    model = HookedTransformer.from_pretrained_no_processing(progress=False)
    fp32_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    state, dense = quantized_state_dict(default_gguf_path(), model.cfg)
    return state, dense, model.state_dict(), fp32_bytes


def test_default_model_blocks_equal_the_fp32_parameters(default) -> None:
    state, dense, fp32, _ = default
    assert_equals_fp32(state, fp32)
    assert dense == []
    assert state["unembed.W_U"] is state["embed.W_E"]
    assert state["embed.W_E"].fmt == "q8_0"
    matrices = [v for k, v in state.items() if k != "embed.W_E" and isinstance(v, QuantizedMatrix)]
    assert len(matrices) == 4 * 30 + 1 and {m.fmt for m in matrices} == {"q4_1", "q8_0"}


def test_default_model_blocks_take_under_two_fifths_of_fp32(default) -> None:
    state, _, _, fp32_bytes = default
    blocks, dense = stored_bytes(state)
    print(
        f"\nblocks {blocks:,} B + dense {dense:,} B = {blocks + dense:,} B; fp32 {fp32_bytes:,} B"
    )
    assert blocks + dense <= 0.4 * fp32_bytes


# Tiny files ----------------------------------------------------------------------------------

LAYER_TYPES = {  # GGUF name -> (HF name, storage type)
    "attn_norm.weight": ("input_layernorm.weight", Q.F32),
    "attn_q.weight": ("self_attn.q_proj.weight", Q.Q4_0),
    "attn_k.weight": ("self_attn.k_proj.weight", Q.Q4_0),
    "attn_v.weight": ("self_attn.v_proj.weight", Q.Q4_0),
    "attn_output.weight": ("self_attn.o_proj.weight", Q.Q8_0),
    "ffn_norm.weight": ("post_attention_layernorm.weight", Q.F32),
    "ffn_gate.weight": ("mlp.gate_proj.weight", Q.Q8_0),
    "ffn_up.weight": ("mlp.up_proj.weight", Q.Q8_0),
    "ffn_down.weight": ("mlp.down_proj.weight", Q.F16),
}


def tiny_file(
    path: Path, tied: bool, changes: dict[str, Q] | None = None, embed: Q = Q.Q8_0
) -> Path:
    """A tiny llama GGUF file with :data:`LAYER_TYPES`'s types, except ``changes``."""
    types = {name: qtype for name, (_, qtype) in LAYER_TYPES.items()} | (changes or {})
    hf = hf_tensors(tied=tied)
    tensors: dict[str, tuple[np.ndarray, Q]] = {
        "token_embd.weight": (hf["model.embed_tokens.weight"], embed),
        "output_norm.weight": (hf["model.norm.weight"], Q.F32),
    }
    if not tied:
        tensors["output.weight"] = (hf["lm_head.weight"], Q.Q4_1)
    heads = {"attn_q.weight": N_HEADS, "attn_k.weight": N_KV}
    for i in range(N_LAYERS):
        for gguf_name, (hf_name, _) in LAYER_TYPES.items():
            weight = hf[f"model.layers.{i}.{hf_name}"]
            if gguf_name in heads:
                weight = llama_cpp_permute(weight, heads[gguf_name])
            tensors[f"blk.{i}.{gguf_name}"] = (weight, types[gguf_name])
    return write_gguf(path, tensors)


def test_tiny_file_keeps_q4_0_and_q8_0_and_lists_f16(tmp_path: Path) -> None:
    path = tiny_file(tmp_path / "tied.gguf", tied=True)
    state, dense = quantized_state_dict(path)
    assert_equals_fp32(state, fp32_state(path))
    assert dense == [f"blk.{i}.ffn_down.weight (F16)" for i in range(N_LAYERS)]
    assert state["unembed.W_U"] is state["embed.W_E"]
    qkv, gate_up = state["blocks.0.attn.W_QKV"], state["blocks.0.mlp.W_gate_in"]
    assert isinstance(qkv, QuantizedMatrix) and qkv.fmt == "q4_0"
    assert isinstance(gate_up, QuantizedMatrix) and gate_up.fmt == "q8_0"
    assert isinstance(state["blocks.0.mlp.W_out"], Tensor)


@pytest.mark.parametrize("tied", [False, True])
def test_mixed_parts_are_dequantized_and_listed(tmp_path: Path, tied: bool) -> None:
    changes = {"attn_k.weight": Q.Q8_0}  # q and v stay Q4_0: W_QKV cannot share one format
    path = tiny_file(tmp_path / "mixed.gguf", tied=tied, changes=changes, embed=Q.F16)
    state, dense = quantized_state_dict(path)
    assert_equals_fp32(state, fp32_state(path))
    layer = ["attn_q.weight (Q4_0)", "attn_k.weight (Q8_0)", "attn_v.weight (Q4_0)"]
    layer.append("ffn_down.weight (F16)")
    want = [f"blk.{i}.{entry}" for i in range(N_LAYERS) for entry in layer]
    assert dense == ["token_embd.weight (F16)", *want]
    for i in range(N_LAYERS):
        assert isinstance(state[f"blocks.{i}.attn.W_QKV"], Tensor)
        assert isinstance(state[f"blocks.{i}.mlp.W_gate_in"], QuantizedMatrix)
    assert isinstance(state["embed.W_E"], Tensor)
    unembed = state["unembed.W_U"]
    if tied:  # W_E.T, as the fp32 loader copies it
        assert isinstance(unembed, Tensor) and unembed.data_ptr() != state["embed.W_E"].data_ptr()
    else:
        assert isinstance(unembed, QuantizedMatrix) and unembed.fmt == "q4_1"


def test_a_config_that_does_not_fit_the_file_is_named(tmp_path: Path) -> None:
    path = tiny_file(tmp_path / "tiny.gguf", tied=True)
    cfg = HookedTransformer.from_pretrained_no_processing(path, progress=False).cfg
    with pytest.raises(ValueError, match=r"cfg\.d_mlp is 128"):
        quantized_state_dict(path, cfg.replace(d_mlp=128))
    state, _ = quantized_state_dict(path, cfg.replace(dtype=torch.float16))
    assert state["blocks.0.ln1.w"].dtype == torch.float16
    assert state["blocks.0.attn.W_QKV"].dequantize().dtype == torch.float32
