"""One converter per HF family from HF's parameter names and layouts to kvlens's.

HF's ``nn.Linear`` stores ``[out, in]``; kvlens stores ``[in, out]`` (see ``components.linear``),
so most weights are transposed. GPT-2's ``Conv1D`` already stores ``[in, out]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from kvlens.config import ModelConfig

# Buffers some checkpoints carry that hold nothing to load.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


class _Reader:
    """Takes tensors out of an HF state dict by name, checking shapes, and tracks what is left."""

    def __init__(self, hf_state_dict: dict[str, Tensor]) -> None:
        self.state = hf_state_dict
        self.used: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.state

    def take(self, key: str, shape: Sequence[int]) -> Tensor:
        if key not in self.state:
            raise ValueError(f"hf_state_dict has no {key!r} (expected shape {tuple(shape)})")
        tensor = self.state[key]
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(
                f"hf_state_dict[{key!r}] has shape {tuple(tensor.shape)}, expected {tuple(shape)}"
            )
        self.used.add(key)
        return tensor

    def finish(self) -> None:
        """Raise if any key was neither taken nor a known buffer."""
        left = [k for k in self.state if k not in self.used and not k.endswith(_IGNORED_SUFFIXES)]
        if left:
            raise ValueError(f"hf_state_dict has keys no kvlens weight takes: {sorted(left)[:8]}")


def _unembed(r: _Reader, cfg: ModelConfig, key: str, embed: Tensor) -> Tensor:
    """``W_U: [d_model, d_vocab]`` from ``lm_head``, or from the embedding when tied."""
    if r.has(key):
        return r.take(key, (cfg.d_vocab, cfg.d_model)).T
    return embed.T


def _norm(r: _Reader, cfg: ModelConfig, hf_prefix: str, name: str) -> dict[str, Tensor]:
    out = {f"{name}.w": r.take(f"{hf_prefix}.weight", (cfg.d_model,))}
    if cfg.normalization_type == "LN":
        out[f"{name}.b"] = r.take(f"{hf_prefix}.bias", (cfg.d_model,))
    return out


def convert_gpt2(cfg: ModelConfig, hf_state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """GPT-2: ``Conv1D`` weights are ``[in, out]`` and ``c_attn`` is already ``[q | k | v]``."""
    r = _Reader(hf_state_dict)
    p = "transformer." if r.has("transformer.wte.weight") else ""
    d, d_mlp, qkv = cfg.d_model, cfg.d_mlp_resolved, 3 * cfg.n_heads * cfg.d_head
    out = {
        "embed.W_E": r.take(f"{p}wte.weight", (cfg.d_vocab, d)),
        "pos_embed.W_pos": r.take(f"{p}wpe.weight", (cfg.n_ctx, d)),
    }
    for i in range(cfg.n_layers):
        h, b = f"{p}h.{i}.", f"blocks.{i}."
        out |= _norm(r, cfg, h + "ln_1", b + "ln1") | _norm(r, cfg, h + "ln_2", b + "ln2")
        out[b + "attn.W_QKV"] = r.take(h + "attn.c_attn.weight", (d, qkv))
        out[b + "attn.b_QKV"] = r.take(h + "attn.c_attn.bias", (qkv,))
        out[b + "attn.W_O_flat"] = r.take(h + "attn.c_proj.weight", (qkv // 3, d))
        out[b + "attn.b_O"] = r.take(h + "attn.c_proj.bias", (d,))
        out[b + "mlp.W_in"] = r.take(h + "mlp.c_fc.weight", (d, d_mlp))
        out[b + "mlp.b_in"] = r.take(h + "mlp.c_fc.bias", (d_mlp,))
        out[b + "mlp.W_out"] = r.take(h + "mlp.c_proj.weight", (d_mlp, d))
        out[b + "mlp.b_out"] = r.take(h + "mlp.c_proj.bias", (d,))
    out |= _norm(r, cfg, f"{p}ln_f", "ln_final")
    out["unembed.W_U"] = _unembed(r, cfg, "lm_head.weight", out["embed.W_E"])
    r.finish()
    return out


def convert_gpt_neox(cfg: ModelConfig, hf_state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """GPT-NeoX (Pythia): the fused ``query_key_value`` is laid out ``[head, 3, d_head]``."""
    r = _Reader(hf_state_dict)
    d, d_mlp, n, dh = cfg.d_model, cfg.d_mlp_resolved, cfg.n_heads, cfg.d_head
    out = {"embed.W_E": r.take("gpt_neox.embed_in.weight", (cfg.d_vocab, d))}
    for i in range(cfg.n_layers):
        h, b = f"gpt_neox.layers.{i}.", f"blocks.{i}."
        out |= _norm(r, cfg, h + "input_layernorm", b + "ln1")
        out |= _norm(r, cfg, h + "post_attention_layernorm", b + "ln2")
        w = r.take(h + "attention.query_key_value.weight", (3 * n * dh, d)).view(n, 3, dh, d)
        out[b + "attn.W_QKV"] = w.transpose(0, 1).reshape(3 * n * dh, d).T
        out[b + "attn.W_O_flat"] = r.take(h + "attention.dense.weight", (d, n * dh)).T
        if cfg.attn_qkv_bias:
            bias = r.take(h + "attention.query_key_value.bias", (3 * n * dh,)).view(n, 3, dh)
            out[b + "attn.b_QKV"] = bias.transpose(0, 1).reshape(-1)
        if cfg.attn_out_bias:
            out[b + "attn.b_O"] = r.take(h + "attention.dense.bias", (d,))
        out[b + "mlp.W_in"] = r.take(h + "mlp.dense_h_to_4h.weight", (d_mlp, d)).T
        out[b + "mlp.W_out"] = r.take(h + "mlp.dense_4h_to_h.weight", (d, d_mlp)).T
        if cfg.mlp_bias:
            out[b + "mlp.b_in"] = r.take(h + "mlp.dense_h_to_4h.bias", (d_mlp,))
            out[b + "mlp.b_out"] = r.take(h + "mlp.dense_4h_to_h.bias", (d,))
    out |= _norm(r, cfg, "gpt_neox.final_layer_norm", "ln_final")
    out["unembed.W_U"] = _unembed(r, cfg, "embed_out.weight", out["embed.W_E"])
    r.finish()
    return out


def convert_llama_like(cfg: ModelConfig, hf_state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Llama, Mistral, Qwen2: separate q/k/v/o projections, gated MLP, RMSNorm."""
    r = _Reader(hf_state_dict)
    out = {"embed.W_E": r.take("model.embed_tokens.weight", (cfg.d_vocab, cfg.d_model))}
    for i in range(cfg.n_layers):
        h, b = f"model.layers.{i}.", f"blocks.{i}."
        out |= _norm(r, cfg, h + "input_layernorm", b + "ln1")
        out |= _norm(r, cfg, h + "post_attention_layernorm", b + "ln2")
        out |= _attention_and_mlp(r, cfg, h, b)
    out |= _norm(r, cfg, "model.norm", "ln_final")
    out["unembed.W_U"] = _unembed(r, cfg, "lm_head.weight", out["embed.W_E"])
    r.finish()
    return out


def convert_gemma2(cfg: ModelConfig, hf_state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Gemma 2: Llama's projections, four norms a layer, and two factors folded into weights.

    HF's Gemma RMSNorm scales by ``1 + w``, so each norm's ``w`` gets ``+ 1``; HF multiplies the
    embeddings by ``sqrt(d_model)`` (rounded to the weights' dtype, as HF does), so ``W_E`` is
    scaled by it, while the tied unembedding keeps the unscaled matrix (both as TransformerLens).
    """
    r = _Reader(hf_state_dict)
    embed = r.take("model.embed_tokens.weight", (cfg.d_vocab, cfg.d_model))
    normalizer = torch.tensor(cfg.d_model**0.5, dtype=embed.dtype)
    out = {"embed.W_E": embed * normalizer}
    norms = {
        "input_layernorm": "ln1",
        "post_attention_layernorm": "ln1_post",
        "pre_feedforward_layernorm": "ln2",
        "post_feedforward_layernorm": "ln2_post",
    }
    for i in range(cfg.n_layers):
        h, b = f"model.layers.{i}.", f"blocks.{i}."
        for hf_name, name in norms.items():
            out |= _one_plus(_norm(r, cfg, h + hf_name, b + name))
        out |= _attention_and_mlp(r, cfg, h, b)
    out |= _one_plus(_norm(r, cfg, "model.norm", "ln_final"))
    out["unembed.W_U"] = _unembed(r, cfg, "lm_head.weight", embed)
    r.finish()
    return out


def _one_plus(norm: dict[str, Tensor]) -> dict[str, Tensor]:
    """A Gemma norm's ``1 + w`` as a plain scale, added in fp32 as HF does (no bias)."""
    return {name: 1.0 + w.float() for name, w in norm.items()}


def _attention_and_mlp(r: _Reader, cfg: ModelConfig, h: str, b: str) -> dict[str, Tensor]:
    """One layer's q/k/v/o projections and gated MLP (Llama's names, under HF prefix ``h``)."""
    d, d_mlp, dh = cfg.d_model, cfg.d_mlp_resolved, cfg.d_head
    q_width, kv_width = cfg.n_heads * dh, cfg.n_kv_heads * dh
    out = {}
    widths = {"q": q_width, "k": kv_width, "v": kv_width}
    qkv = [r.take(f"{h}self_attn.{x}_proj.weight", (w, d)) for x, w in widths.items()]
    out[b + "attn.W_QKV"] = torch.cat(qkv, dim=0).T
    if cfg.attn_qkv_bias:
        biases = [r.take(f"{h}self_attn.{x}_proj.bias", (w,)) for x, w in widths.items()]
        out[b + "attn.b_QKV"] = torch.cat(biases)
    out[b + "attn.W_O_flat"] = r.take(h + "self_attn.o_proj.weight", (d, q_width)).T
    if cfg.attn_out_bias:
        out[b + "attn.b_O"] = r.take(h + "self_attn.o_proj.bias", (d,))
    gate_up = [r.take(f"{h}mlp.{x}_proj.weight", (d_mlp, d)) for x in ("gate", "up")]
    out[b + "mlp.W_gate_in"] = torch.cat(gate_up, dim=0).T
    out[b + "mlp.W_out"] = r.take(h + "mlp.down_proj.weight", (d, d_mlp)).T
    if cfg.mlp_bias:
        gate_up_b = [r.take(f"{h}mlp.{x}_proj.bias", (d_mlp,)) for x in ("gate", "up")]
        out[b + "mlp.b_gate_in"] = torch.cat(gate_up_b)
        out[b + "mlp.b_out"] = r.take(h + "mlp.down_proj.bias", (d,))
    return out


CONVERTERS: dict[str, Callable[[ModelConfig, dict[str, Tensor]], dict[str, Tensor]]] = {
    "GPT2LMHeadModel": convert_gpt2,
    "GPTNeoXForCausalLM": convert_gpt_neox,
    "LlamaForCausalLM": convert_llama_like,
    "MistralForCausalLM": convert_llama_like,
    "Qwen2ForCausalLM": convert_llama_like,
    "Gemma2ForCausalLM": convert_gemma2,
}
