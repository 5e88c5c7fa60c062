"""Worker of the generation benchmark for the peers; ``bench_generate.py`` starts one per shape.

Runs in the peers' virtual environment (``make-peer-venv.sh`` beside this file), never in
kvlens's. Systems, all greedy, fp32, random weights of the shape in the spec:

- ``tl``: TransformerLens 2.18 ``HookedTransformer.generate(..., use_past_kv_cache=True)``;
- ``hf-dynamic``: transformers 4.57.6 ``generate`` with its default ``DynamicCache``;
- ``hf-static``: the same with ``cache_implementation="static"`` (not compiled: transformers
  compiles a static-cache generate only on CUDA).

Each new token is timed by a forward hook on the unembedding (TL's ``unembed``, HF's
``lm_head``), which runs once per new token, last in every forward pass.

Usage (normally through bench_generate.py)::

    .peer-venv/bin/python benchmarks/peers/generate_peer.py '<JSON spec>'
"""

from __future__ import annotations

import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

# The shared harness lives one folder up; this script runs outside kvlens's environment.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from generate_harness import System, Timing, main, module_info


def _require(shape: dict[str, Any], family: str, **expected: Any) -> None:
    wrong = {k: shape[k] for k, v in expected.items() if shape[k] != v}
    if wrong:
        raise ValueError(f"a {family} shape needs {expected}; this shape has {wrong}")


def build_hf(shape: dict[str, Any]) -> nn.Module:
    """A GPT-2 or Llama model of the shape; embeddings untied, as kvlens and TL store them."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if shape["positional_embedding_type"] == "standard":
        _require(
            shape,
            "GPT-2",
            act_fn="gelu_new",
            normalization_type="LN",
            gated_mlp=False,
            attn_qkv_bias=True,
            attn_out_bias=True,
            mlp_bias=True,
            n_key_value_heads=None,
        )
        config = GPT2Config(
            vocab_size=shape["d_vocab"],
            n_positions=shape["n_ctx"],
            n_embd=shape["d_model"],
            n_layer=shape["n_layers"],
            n_head=shape["n_heads"],
            n_inner=shape["d_mlp"],
            activation_function="gelu_new",
            layer_norm_epsilon=shape["eps"],
            tie_word_embeddings=False,
        )
        model = GPT2LMHeadModel(config)
    else:
        _require(
            shape,
            "Llama",
            act_fn="silu",
            normalization_type="RMS",
            gated_mlp=True,
            attn_qkv_bias=False,
            attn_out_bias=False,
            mlp_bias=False,
        )
        config = LlamaConfig(
            vocab_size=shape["d_vocab"],
            hidden_size=shape["d_model"],
            intermediate_size=shape["d_mlp"],
            num_hidden_layers=shape["n_layers"],
            num_attention_heads=shape["n_heads"],
            num_key_value_heads=shape["n_key_value_heads"] or shape["n_heads"],
            head_dim=shape["d_head"],
            max_position_embeddings=shape["n_ctx"],
            rope_theta=shape["rotary_base"],
            rms_norm_eps=shape["eps"],
            hidden_act="silu",
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(config)
    # No EOS: every call generates exactly the tokens asked for.
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = None
        cfg.bos_token_id = None
        cfg.pad_token_id = 0
    return model.eval()


class _NoTokenizer:
    """What TL 2.18's ``generate`` reads from a tokenizer when given tokens (it asserts one).

    The pad id is not 0: TL builds its attention mask from an all-zeros tensor each step, and a
    real tokenizer's pad id (GPT-2's 50256) leaves that mask all ones.
    """

    padding_side = "right"

    def __init__(self, d_vocab: int) -> None:
        self.pad_token_id = self.bos_token_id = self.eos_token_id = d_vocab - 1


def tl_config(shape: dict[str, Any], **changes: Any) -> Any:
    """TransformerLens 2.18's config of a benchmark shape (fp32 on the CPU), with ``changes``."""
    from transformer_lens import HookedTransformerConfig

    rotary = shape["positional_embedding_type"] == "rotary"
    fields: dict[str, Any] = dict(
        n_layers=shape["n_layers"],
        d_model=shape["d_model"],
        n_heads=shape["n_heads"],
        d_head=shape["d_head"],
        n_ctx=shape["n_ctx"],
        d_vocab=shape["d_vocab"],
        d_mlp=shape["d_mlp"],
        n_key_value_heads=shape["n_key_value_heads"],
        act_fn=shape["act_fn"],
        normalization_type=shape["normalization_type"],
        eps=shape["eps"],
        positional_embedding_type=shape["positional_embedding_type"],
        rotary_dim=shape["d_head"] if rotary else None,
        rotary_base=int(shape["rotary_base"]),
        gated_mlp=shape["gated_mlp"],
        final_rms=shape["final_norm"] and shape["normalization_type"] == "RMS",
        default_prepend_bos=False,
        device="cpu",
        dtype=torch.float32,
    )
    return HookedTransformerConfig(**(fields | changes))


def build_tl(shape: dict[str, Any], seed: int) -> nn.Module:
    from transformer_lens import HookedTransformer

    cfg = tl_config(shape, seed=seed)
    model = HookedTransformer(cfg)
    model.tokenizer = _NoTokenizer(shape["d_vocab"])
    return model.eval()


def build(spec: dict[str, Any]) -> System:
    system, shape = spec["system"], spec["shape"]
    stamps: list[float] = []

    def note_time(*_: Any) -> None:
        stamps.append(time.perf_counter())

    if system == "tl":
        model = build_tl(shape, spec["seed"])
        model.unembed.register_forward_hook(note_time)

        def call(tokens: Tensor, n: int) -> Tensor:
            return model.generate(
                tokens,
                max_new_tokens=n,
                do_sample=False,
                stop_at_eos=False,
                verbose=False,
                use_past_kv_cache=True,
                return_type="tokens",
            )

    elif system in ("hf-dynamic", "hf-static"):
        model = build_hf(shape)
        model.lm_head.register_forward_hook(note_time)
        cache = "static" if system == "hf-static" else None

        def call(tokens: Tensor, n: int) -> Tensor:
            return model.generate(
                tokens,
                attention_mask=torch.ones_like(tokens),
                max_new_tokens=n,
                do_sample=False,
                cache_implementation=cache,
            )

    else:
        raise ValueError(f"unknown peer system {system!r}; known: tl, hf-dynamic, hf-static")

    def generate(tokens: Tensor, n: int) -> Timing:
        stamps.clear()
        start = time.perf_counter()
        out = call(tokens, n)
        end = time.perf_counter()
        if tuple(out.shape) != (tokens.shape[0], tokens.shape[1] + n):
            raise RuntimeError(f"{system} returned {tuple(out.shape)} for {n} new tokens")
        return Timing(start, list(stamps), end)

    def reset() -> None:
        # transformers keeps a static cache on the model between generate calls, to reuse it; it
        # is dropped between configurations so each one's memory is its own.
        if hasattr(model, "_cache"):
            del model._cache

    versions = {"transformers": version("transformers"), "transformer_lens": None}
    if system == "tl":
        versions["transformer_lens"] = version("transformer-lens")
    return System(generate, {**versions, **module_info(model)}, reset)


if __name__ == "__main__":
    main(build)
