"""config_from_hf and convert_hf_state_dict: field mapping, checks, and key handling."""

from __future__ import annotations

import pytest
import torch
from tests.helpers import hf_config, make_hf_model, model_pair, tokens_for

from kvlens.loading import config_from_hf, convert_hf_state_dict
from kvlens.model import HookedTransformer


def test_gpt2_config() -> None:
    cfg = config_from_hf(hf_config("gpt2"))
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp) == (2, 32, 4, 8, 128)
    assert cfg.act_fn == "gelu_new" and cfg.normalization_type == "LN"
    assert cfg.positional_embedding_type == "standard" and cfg.n_ctx == 64
    assert cfg.original_architecture == "GPT2LMHeadModel" and cfg.dtype == torch.float32


def test_gpt_neox_config() -> None:
    cfg = config_from_hf(hf_config("pythia", rotary_pct=0.25, rotary_emb_base=1234.0))
    assert cfg.rotary_dim == 2 and cfg.rotary_base == 1234.0 and not cfg.rotary_adjacent_pairs
    assert cfg.parallel_attn_mlp and cfg.attn_qkv_bias and cfg.attn_out_bias
    assert cfg.act_fn == "gelu" and not cfg.gated_mlp


def test_llama_family_configs() -> None:
    llama = config_from_hf(hf_config("llama"))
    assert llama.n_kv_heads == 2 and llama.normalization_type == "RMS" and llama.gated_mlp
    assert not (llama.attn_qkv_bias or llama.attn_out_bias or llama.mlp_bias)
    assert llama.act_fn == "silu" and llama.rotary_base == 500.0 and llama.rotary_dim is None
    qwen = config_from_hf(hf_config("qwen2"))
    assert qwen.attn_qkv_bias and not qwen.attn_out_bias
    assert config_from_hf(hf_config("llama", head_dim=16)).d_head == 16


def test_sliding_window_caps_n_ctx() -> None:
    assert config_from_hf(hf_config("mistral", sliding_window=16)).n_ctx == 16
    assert config_from_hf(hf_config("mistral", sliding_window=None)).n_ctx == 64
    qwen = hf_config("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=0)
    assert config_from_hf(qwen).n_ctx == 16
    assert config_from_hf(hf_config("qwen2", sliding_window=16)).n_ctx == 64  # not in use


def test_dtype_and_unsupported_configs() -> None:
    cfg = config_from_hf(hf_config("llama", torch_dtype="bfloat16"))
    assert cfg.dtype == torch.bfloat16
    assert config_from_hf(hf_config("llama"), dtype=torch.float16).dtype == torch.float16
    with pytest.raises(ValueError, match="rope_scaling"):
        config_from_hf(hf_config("llama", rope_scaling={"rope_type": "linear", "factor": 2.0}))
    with pytest.raises(ValueError, match="activation 'quick_gelu'"):
        config_from_hf(hf_config("gpt2", activation_function="quick_gelu"))
    import transformers

    with pytest.raises(ValueError, match="model_type is 'opt'"):
        config_from_hf(transformers.OPTConfig())


def test_converter_checks_shapes_and_keys() -> None:
    hf_model, _ = model_pair("llama")
    cfg = config_from_hf(hf_model.config)
    state = dict(hf_model.state_dict())
    bad = dict(state)
    bad["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(8, 32)
    with pytest.raises(
        ValueError, match=r"k_proj.weight'\] has shape \(8, 32\), expected \(16, 32\)"
    ):
        convert_hf_state_dict(cfg, bad)
    missing = {k: v for k, v in state.items() if "up_proj" not in k}
    with pytest.raises(ValueError, match=r"has no 'model\.layers\.0\.mlp\.up_proj\.weight'"):
        convert_hf_state_dict(cfg, missing)
    with pytest.raises(ValueError, match=r"no kvlens weight takes.*extra"):
        convert_hf_state_dict(cfg, state | {"model.extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="original_architecture"):
        convert_hf_state_dict(cfg.replace(original_architecture="OPTForCausalLM"), state)
    converted = convert_hf_state_dict(cfg.replace(dtype=torch.bfloat16), state)
    assert all(t.dtype == torch.bfloat16 and t.is_contiguous() for t in converted.values())


@torch.no_grad()
def test_tied_checkpoint_without_lm_head() -> None:
    hf_model, model = model_pair("qwen2")
    state = {k: v for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    rebuilt = HookedTransformer(model.cfg, init_weights=False)
    rebuilt.load_state_dict(convert_hf_state_dict(model.cfg, state), strict=True)
    tokens = tokens_for(30, 1, 5)
    assert torch.equal(rebuilt(tokens), model(tokens))


@torch.no_grad()
def test_gpt2_checkpoint_names_without_prefix() -> None:
    """GPT-2 checkpoint files name weights without ``transformer.`` and carry mask buffers."""
    hf_model, model = model_pair("gpt2")
    state = {k.removeprefix("transformer."): v for k, v in hf_model.state_dict().items()}
    state["h.0.attn.bias"] = torch.ones(1, 1, 64, 64)
    rebuilt = HookedTransformer(model.cfg, init_weights=False)
    rebuilt.load_state_dict(convert_hf_state_dict(model.cfg, state), strict=True)
    tokens = tokens_for(31, 1, 5)
    assert torch.equal(rebuilt(tokens), model(tokens))


def test_from_hf_model_keeps_dtype_unless_told() -> None:
    hf_model = make_hf_model("mistral")
    assert HookedTransformer.from_hf_model(hf_model).cfg.dtype == torch.float32
    half = HookedTransformer.from_hf_model(hf_model, dtype=torch.bfloat16)
    assert half.cfg.dtype == torch.bfloat16 and half.W_E.dtype == torch.bfloat16
    assert half.rotary.rotary_cos.dtype == torch.bfloat16
