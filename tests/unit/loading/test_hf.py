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


def test_gemma2_config() -> None:
    cfg = config_from_hf(hf_config("gemma2", rms_norm_eps=1e-5, rope_theta=321.0))
    assert cfg.original_architecture == "Gemma2ForCausalLM"
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head) == (3, 32, 4, 2, 8)
    assert cfg.d_mlp == 48 and cfg.n_ctx == 64 and cfg.d_vocab == 97
    assert cfg.normalization_type == "RMS" and cfg.eps == 1e-5 and cfg.final_norm
    assert cfg.positional_embedding_type == "rotary" and cfg.rotary_base == 321.0
    assert not cfg.rotary_adjacent_pairs and cfg.rotary_dim is None
    assert cfg.gated_mlp and cfg.act_fn == "gelu_pytorch_tanh"
    assert not (cfg.attn_qkv_bias or cfg.attn_out_bias or cfg.mlp_bias)
    assert cfg.attn_scale == pytest.approx(12**0.5)
    assert cfg.attn_scores_soft_cap == 3.0 and cfg.output_logits_soft_cap == 3.0
    assert cfg.use_normalization_before_and_after
    # HF 4.57 makes the even layers sliding (TransformerLens's order is the other way round).
    assert cfg.window_size == 6 and cfg.attn_types == ("local", "global", "local")


def test_gemma2_config_variants() -> None:
    off = config_from_hf(
        hf_config("gemma2", attn_logit_softcapping=None, final_logit_softcapping=None)
    )
    assert off.attn_scores_soft_cap == -1 and off.output_logits_soft_cap == -1
    biased = config_from_hf(hf_config("gemma2", attention_bias=True))
    assert biased.attn_qkv_bias and biased.attn_out_bias and not biased.mlp_bias
    types = ["full_attention", "sliding_attention", "sliding_attention"]
    assert config_from_hf(hf_config("gemma2", layer_types=types)).attn_types == (
        "global",
        "local",
        "local",
    )
    all_global = config_from_hf(hf_config("gemma2", layer_types=["full_attention"] * 3))
    assert all_global.window_size is None and all_global.attn_types is None
    old = hf_config("gemma2", hidden_act="gelu")
    old.hidden_activation = None  # configs from before hidden_activation existed
    assert config_from_hf(old).act_fn == "gelu"
    unknown = hf_config("gemma2")
    unknown.layer_types = ["sliding_attention", "chunked_attention", "full_attention"]
    with pytest.raises(ValueError, match=r"layer_types has \['chunked_attention'\]"):
        config_from_hf(unknown)


def test_mistral_window_applies_to_every_layer() -> None:
    cfg = config_from_hf(hf_config("mistral", sliding_window=16))
    assert cfg.window_size == 16 and cfg.attn_types is None and cfg.n_ctx == 64
    assert [cfg.layer_window(i) for i in range(2)] == [16, 16]
    none = config_from_hf(hf_config("mistral", sliding_window=None))
    assert none.window_size is None and none.n_ctx == 64
    wide = config_from_hf(hf_config("mistral", sliding_window=4096))  # wider than n_ctx: kept
    assert wide.window_size == 4096 and wide.n_ctx == 64
    # Mistral's model slides in every layer even when its config names layer types.
    typed = config_from_hf(
        hf_config("mistral", sliding_window=8, layer_types=["full_attention"] * 2)
    )
    assert typed.window_size == 8 and typed.attn_types is None


def test_qwen2_window_follows_layer_types() -> None:
    on = dict(use_sliding_window=True, sliding_window=16)
    cfg = config_from_hf(hf_config("qwen2", **on, max_window_layers=1))
    assert cfg.window_size == 16 and cfg.attn_types == ("global", "local") and cfg.n_ctx == 64
    every = config_from_hf(hf_config("qwen2", **on, max_window_layers=0))
    assert every.attn_types == ("local", "local")
    # max_window_layers covers every layer, or use_sliding_window is off: no window.
    assert config_from_hf(hf_config("qwen2", **on, max_window_layers=2)).window_size is None
    off = config_from_hf(hf_config("qwen2", sliding_window=16))
    assert off.window_size is None and off.attn_types is None and off.n_ctx == 64
    explicit = hf_config("qwen2", **on, layer_types=["sliding_attention", "full_attention"])
    assert config_from_hf(explicit).attn_types == ("local", "global")
    older = hf_config("qwen2", **on, max_window_layers=1)
    del older.layer_types  # a config object from before HF had layer_types
    assert config_from_hf(older).attn_types == ("global", "local")


def test_llama_has_no_window() -> None:
    cfg = config_from_hf(hf_config("llama", sliding_window=8))
    assert cfg.window_size is None and cfg.attn_types is None and cfg.n_ctx == 64


def test_gemma2_converter_checks_every_norm() -> None:
    hf_model = make_hf_model("gemma2")
    cfg = config_from_hf(hf_model.config)
    state = dict(hf_model.state_dict())
    missing = {k: v for k, v in state.items() if "layers.2.post_feedforward_layernorm" not in k}
    with pytest.raises(ValueError, match=r"has no 'model\.layers\.2\.post_feedforward_layernorm"):
        convert_hf_state_dict(cfg, missing)
    converted = convert_hf_state_dict(cfg, state)
    rebuilt = HookedTransformer(cfg, init_weights=False)
    rebuilt.load_state_dict(converted, strict=True)
    assert sum(name.endswith("_post.w") for name in converted) == 2 * cfg.n_layers
    half = convert_hf_state_dict(cfg.replace(dtype=torch.bfloat16), state)
    assert all(t.dtype == torch.bfloat16 and t.is_contiguous() for t in half.values())


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
