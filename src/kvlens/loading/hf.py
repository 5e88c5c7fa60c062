"""HF ``transformers`` configs and state dicts to kvlens's: GPT-2, GPT-NeoX, Llama, Mistral, Qwen2,
Gemma 2.

``config_from_hf`` reads a ``PretrainedConfig``; ``convert_hf_state_dict`` maps a state dict with
HF's parameter names (as ``model.state_dict()`` or a checkpoint file holds them) to kvlens's
names and layouts, checking every shape (the per-family converters are in ``hf_weights``).
``transformers`` itself is never imported here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from kvlens.config import ActFn, AttnType, ModelConfig
from kvlens.loading.hf_weights import CONVERTERS

# HF model_type -> the architecture name kvlens records and dispatches the weights on.
_ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel",
    "gpt_neox": "GPTNeoXForCausalLM",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
}

# HF ``layer_types`` entries -> kvlens ``attn_types``.
_LAYER_TYPES: dict[str, AttnType] = {"sliding_attention": "local", "full_attention": "global"}

_ACT_FNS: dict[str, ActFn] = {
    "gelu": "gelu",
    "gelu_new": "gelu_new",
    "gelu_pytorch_tanh": "gelu_pytorch_tanh",
    "silu": "silu",
    "swish": "silu",
    "relu": "relu",
}

# Configs ------------------------------------------------------------------------------------


def config_from_hf(
    hf_config: Any,
    *,
    dtype: torch.dtype | None = None,
    device: str | None = None,
) -> ModelConfig:
    """The kvlens config of an HF config of a supported family.

    Args:
        hf_config: A ``transformers.PretrainedConfig`` (``GPT2Config``, ``GPTNeoXConfig``,
            ``LlamaConfig``, ``MistralConfig``, ``Qwen2Config`` or ``Gemma2Config``).
        dtype: Dtype of the weights; default the config's ``dtype``/``torch_dtype`` when it is
            a float type, else float32.
        device: Device of the weights (default: torch's default).

    Raises:
        ValueError: For an unsupported family, activation or rope scaling.
    """
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in _ARCHITECTURES:
        raise ValueError(
            f"hf_config.model_type is {model_type!r}; supported: {sorted(_ARCHITECTURES)}"
        )
    fields = _CONFIG_READERS[model_type](hf_config)
    return ModelConfig(
        **fields,
        dtype=dtype if dtype is not None else _config_dtype(hf_config),
        device=device,
        model_name=getattr(hf_config, "_name_or_path", "") or model_type,
        original_architecture=_ARCHITECTURES[model_type],
    )


def _config_dtype(hf_config: Any) -> torch.dtype:
    value = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    if isinstance(value, torch.dtype) and value.is_floating_point:
        return value
    return torch.float32


def _act_fn(name: str) -> ActFn:
    if name not in _ACT_FNS:
        raise ValueError(f"activation {name!r} is not supported; supported: {sorted(_ACT_FNS)}")
    return _ACT_FNS[name]


def _check_rope_scaling(hf_config: Any) -> None:
    scaling = getattr(hf_config, "rope_scaling", None)
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "default":
            raise ValueError(f"rope_scaling {scaling!r} is not supported (only unscaled rotary)")


def _gpt2_config(c: Any) -> dict[str, Any]:
    if not getattr(c, "scale_attn_weights", True) or getattr(
        c, "scale_attn_by_inverse_layer_idx", False
    ):
        raise ValueError("GPT-2 configs with unscaled or layer-scaled attention are not supported")
    return dict(
        n_layers=c.n_layer,
        d_model=c.n_embd,
        n_heads=c.n_head,
        d_head=c.n_embd // c.n_head,
        n_ctx=c.n_positions,
        d_vocab=c.vocab_size,
        d_mlp=c.n_inner or 4 * c.n_embd,
        act_fn=_act_fn(c.activation_function),
        normalization_type="LN",
        eps=c.layer_norm_epsilon,
        positional_embedding_type="standard",
    )


def _neox_config(c: Any) -> dict[str, Any]:
    _check_rope_scaling(c)
    d_head = c.hidden_size // c.num_attention_heads
    rotary_pct = getattr(c, "partial_rotary_factor", None) or c.rotary_pct
    bias = getattr(c, "attention_bias", True)
    return dict(
        n_layers=c.num_hidden_layers,
        d_model=c.hidden_size,
        n_heads=c.num_attention_heads,
        d_head=d_head,
        n_ctx=c.max_position_embeddings,
        d_vocab=c.vocab_size,
        d_mlp=c.intermediate_size,
        act_fn=_act_fn(c.hidden_act),
        normalization_type="LN",
        eps=c.layer_norm_eps,
        positional_embedding_type="rotary",
        rotary_dim=int(d_head * rotary_pct),
        rotary_base=float(getattr(c, "rope_theta", None) or c.rotary_emb_base),
        parallel_attn_mlp=c.use_parallel_residual,
        attn_qkv_bias=bias,
        attn_out_bias=bias,
    )


def _llama_like_config(c: Any, act: str | None = None) -> dict[str, Any]:
    """Llama, Mistral and Qwen2 (and Gemma 2's base): RMSNorm, rotary (rotate_half pairs),
    gated MLP; ``act`` is the activation's HF name (default ``c.hidden_act``)."""
    _check_rope_scaling(c)
    model_type = c.model_type
    d_head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if model_type == "llama":
        qkv_bias = out_bias = bool(getattr(c, "attention_bias", False))
    else:
        qkv_bias, out_bias = model_type == "qwen2", False
    return dict(
        n_layers=c.num_hidden_layers,
        d_model=c.hidden_size,
        n_heads=c.num_attention_heads,
        d_head=d_head,
        n_ctx=int(c.max_position_embeddings),
        d_vocab=c.vocab_size,
        d_mlp=c.intermediate_size,
        n_key_value_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        act_fn=_act_fn(act or c.hidden_act),
        normalization_type="RMS",
        eps=c.rms_norm_eps,
        positional_embedding_type="rotary",
        rotary_base=float(c.rope_theta),
        rotary_adjacent_pairs=False,
        gated_mlp=True,
        attn_qkv_bias=qkv_bias,
        attn_out_bias=out_bias,
        mlp_bias=bool(getattr(c, "mlp_bias", False)),
        **_window_fields(c),
    )


def _gemma2_config(c: Any) -> dict[str, Any]:
    """Gemma 2: Llama-like, plus norms after attention and after the MLP, its own query scale,
    soft-capped attention scores and logits, and local (sliding) layers among global ones.

    The embedding's ``sqrt(d_model)`` factor and the norms' ``1 + w`` are folded into the
    weights by the converter (as TransformerLens does), so no config field holds them.
    """
    bias = bool(getattr(c, "attention_bias", False))
    act = getattr(c, "hidden_activation", None) or c.hidden_act
    return _llama_like_config(c, act) | dict(
        d_head=c.head_dim,
        attn_qkv_bias=bias,
        attn_out_bias=bias,
        mlp_bias=False,
        attn_scale=float(c.query_pre_attn_scalar) ** 0.5,
        attn_scores_soft_cap=_soft_cap(getattr(c, "attn_logit_softcapping", None)),
        output_logits_soft_cap=_soft_cap(getattr(c, "final_logit_softcapping", None)),
        use_normalization_before_and_after=True,
    )


def _soft_cap(value: float | None) -> float:
    """HF's soft cap (``None`` is off) as kvlens's (``-1`` is off)."""
    return float(value) if value else -1.0


def _window_fields(c: Any) -> dict[str, Any]:
    """``window_size`` and ``attn_types`` as HF 4.57's attention reads them.

    Llama has no window. Mistral's ``sliding_window`` (``None``: none) applies to every layer
    (its model ignores ``layer_types``). Qwen2 and Gemma 2 give each layer's kind in
    ``layer_types``; Qwen2 slides only with ``use_sliding_window``. Without ``layer_types``, HF
    makes Qwen2's layers ``i >= max_window_layers`` sliding and Gemma 2's even layers.
    """
    window = getattr(c, "sliding_window", None)
    if c.model_type == "llama" or (
        c.model_type == "qwen2" and not getattr(c, "use_sliding_window", False)
    ):
        window = None
    if window is None:
        return dict(window_size=None, attn_types=None)
    if c.model_type == "mistral":
        return dict(window_size=int(window), attn_types=None)
    layer_types = getattr(c, "layer_types", None)
    if layer_types is None:  # what HF 4.57 builds then
        first = int(getattr(c, "max_window_layers", 0)) if c.model_type == "qwen2" else 0
        layer_types = [
            "sliding_attention"
            if (i >= first if c.model_type == "qwen2" else i % 2 == 0)
            else "full_attention"
            for i in range(c.num_hidden_layers)
        ]
    unknown = sorted(set(layer_types) - set(_LAYER_TYPES))
    if unknown:
        raise ValueError(f"hf_config.layer_types has {unknown}; supported: {sorted(_LAYER_TYPES)}")
    attn_types = tuple(_LAYER_TYPES[t] for t in layer_types)
    if "local" not in attn_types:
        return dict(window_size=None, attn_types=None)
    return dict(window_size=int(window), attn_types=attn_types)


_CONFIG_READERS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "gpt2": _gpt2_config,
    "gpt_neox": _neox_config,
    "llama": _llama_like_config,
    "mistral": _llama_like_config,
    "qwen2": _llama_like_config,
    "gemma2": _gemma2_config,
}


# State dicts ----------------------------------------------------------------------------------


def convert_hf_state_dict(cfg: ModelConfig, hf_state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map an HF state dict to kvlens's parameter names and layouts.

    Args:
        cfg: The config from :func:`config_from_hf`; ``cfg.original_architecture`` picks the
            converter (``"GPT2LMHeadModel"``, ``"GPTNeoXForCausalLM"``, ``"LlamaForCausalLM"``,
            ``"MistralForCausalLM"``, ``"Qwen2ForCausalLM"``, ``"Gemma2ForCausalLM"``).
        hf_state_dict: Tensors under HF's names. A checkpoint of a model with tied embeddings may
            leave out ``lm_head.weight``; the embedding is then used (and copied: kvlens keeps
            its own ``unembed.W_U``).

    Returns:
        A state dict for ``HookedTransformer(cfg).load_state_dict(..., strict=True)``, every
        tensor contiguous and in ``cfg.dtype``.

    Raises:
        ValueError: A tensor is missing or has the wrong shape, or a key is left that no kvlens
            weight takes.
    """
    arch = cfg.original_architecture
    if arch not in CONVERTERS:
        raise ValueError(f"cfg.original_architecture is {arch!r}; supported: {sorted(CONVERTERS)}")
    converted = CONVERTERS[arch](cfg, hf_state_dict)
    return {name: t.to(dtype=cfg.dtype).contiguous() for name, t in converted.items()}
