"""Worker of the shared-prefix benchmark for TransformerLens and Hugging Face.

Runs in the peers' virtual environment (``make-peer-venv.sh`` beside this file), never in
kvlens's; ``bench_shared_prefix.py`` starts one per configuration. Systems, greedy, fp32,
random weights of SmolLM2-135M's shape:

- ``tl``: TransformerLens 2.18. The prefix runs through ``HookedTransformer.forward`` into a
  batch-1 ``HookedTransformerKeyValueCache``; a run repeats its keys, values and mask to batch N
  (TL's frozen-cache recipe needs the cache at the input's batch size), then runs the suffixes and
  each decode step through ``forward`` over that cache, taking the argmax (what TL's ``generate``
  does per step; TL 2.18's ``generate`` cannot start from a given cache).
- ``hf``: transformers 4.57.6 ``LlamaForCausalLM`` (SDPA attention, tied embeddings). The prefix
  fills a ``DynamicCache``; a run deep-copies it, repeats it to batch N
  (``batch_repeat_interleave``) and calls ``generate`` on prefix + suffix with it, as HF's
  prompt-reuse recipe does. Each new token is timed by a forward hook on ``lm_head``.

Usage (normally through bench_shared_prefix.py)::

    .peer-venv/bin/python benchmarks/peers/shared_prefix_peer.py '<JSON spec>'
"""

from __future__ import annotations

import copy
import json
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

# The harness lives one folder up; this script runs outside kvlens's environment.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shared_prefix_harness import SMOLLM2, Run, stamps_to_run, tensor_mb, worker_main


def param_info(model: nn.Module) -> dict[str, Any]:
    params = {p.data_ptr(): p for p in model.parameters()}  # tied weights once
    n_params = sum(p.numel() for p in params.values())
    return {"n_params": n_params, "weights_mb": 4 * n_params / 1e6}


class TransformerLensSystem:
    def __init__(self, seed: int) -> None:
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        cfg = HookedTransformerConfig(
            n_layers=SMOLLM2["n_layers"],
            d_model=SMOLLM2["d_model"],
            n_heads=SMOLLM2["n_heads"],
            n_key_value_heads=SMOLLM2["n_key_value_heads"],
            d_head=SMOLLM2["d_head"],
            d_mlp=SMOLLM2["d_mlp"],
            d_vocab=SMOLLM2["d_vocab"],
            n_ctx=SMOLLM2["n_ctx"],
            eps=SMOLLM2["eps"],
            act_fn="silu",
            normalization_type="RMS",
            positional_embedding_type="rotary",
            rotary_dim=SMOLLM2["d_head"],
            rotary_base=int(SMOLLM2["rotary_base"]),
            gated_mlp=True,
            final_rms=True,
            default_prepend_bos=False,
            device="cpu",
            dtype=torch.float32,
            seed=seed,
        )
        self.model = HookedTransformer(cfg).eval()

    def prefill_prefix(self, prefix: Tensor) -> Any:
        from transformer_lens.past_key_value_caching import HookedTransformerKeyValueCache

        cache = HookedTransformerKeyValueCache.init_cache(self.model.cfg, "cpu", 1)
        mask = torch.ones_like(prefix)
        self.model(prefix, return_type=None, past_kv_cache=cache, attention_mask=mask)
        return cache

    def run(self, state: Any, suffixes: Tensor, steps: int) -> Run:
        from transformer_lens.past_key_value_caching import (
            HookedTransformerKeyValueCache,
            HookedTransformerKeyValueCacheEntry,
        )

        clock = time.perf_counter
        rows = suffixes.shape[0]
        started = clock()
        entries = [
            HookedTransformerKeyValueCacheEntry(
                e.past_keys.repeat(rows, 1, 1, 1), e.past_values.repeat(rows, 1, 1, 1)
            )
            for e in state.entries
        ]
        mask = state.previous_attention_mask.repeat(rows, 1)
        cache = HookedTransformerKeyValueCache(entries, mask)
        copy_s = clock() - started
        start = clock()
        logits = self.model(suffixes, past_kv_cache=cache, attention_mask=torch.ones_like(suffixes))
        token = logits[:, -1].argmax(-1)
        stamps = [clock()]
        one = torch.ones(rows, 1, dtype=suffixes.dtype)
        for _ in range(steps):
            logits = self.model(token[:, None], past_kv_cache=cache, attention_mask=one)
            token = logits[:, -1].argmax(-1)
            stamps.append(clock())
        kv = [t for e in cache.entries for t in (e.past_keys, e.past_values)]
        return stamps_to_run(start, stamps, copy_s, tensor_mb(kv), steps)


class HuggingFaceSystem:
    def __init__(self) -> None:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=SMOLLM2["d_vocab"],
            hidden_size=SMOLLM2["d_model"],
            intermediate_size=SMOLLM2["d_mlp"],
            num_hidden_layers=SMOLLM2["n_layers"],
            num_attention_heads=SMOLLM2["n_heads"],
            num_key_value_heads=SMOLLM2["n_key_value_heads"],
            head_dim=SMOLLM2["d_head"],
            max_position_embeddings=SMOLLM2["n_ctx"],
            rope_theta=SMOLLM2["rotary_base"],
            rms_norm_eps=SMOLLM2["eps"],
            hidden_act="silu",
            tie_word_embeddings=True,
        )
        self.model = LlamaForCausalLM(config).eval()
        # No EOS: every call generates exactly the tokens asked for.
        for cfg in (self.model.config, self.model.generation_config):
            cfg.eos_token_id = None
            cfg.bos_token_id = None
            cfg.pad_token_id = 0
        self.stamps: list[float] = []
        self.model.lm_head.register_forward_hook(lambda *_: self.stamps.append(time.perf_counter()))

    def prefill_prefix(self, prefix: Tensor) -> Any:
        from transformers import DynamicCache

        cache = DynamicCache()
        self.model(prefix, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return prefix, cache

    def run(self, state: Any, suffixes: Tensor, steps: int) -> Run:
        prefix, prompt_cache = state
        rows = suffixes.shape[0]
        clock = time.perf_counter
        started = clock()
        cache = copy.deepcopy(prompt_cache)
        cache.batch_repeat_interleave(rows)
        copy_s = clock() - started
        tokens = torch.cat((prefix.expand(rows, -1), suffixes), dim=1)
        self.stamps.clear()
        start = clock()
        out = self.model.generate(
            tokens,
            attention_mask=torch.ones_like(tokens),
            past_key_values=cache,
            max_new_tokens=steps + 1,
            do_sample=False,
        )
        if tuple(out.shape) != (rows, tokens.shape[1] + steps + 1):
            raise RuntimeError(f"hf returned {tuple(out.shape)} for {steps + 1} new tokens")
        kv = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        return stamps_to_run(start, list(self.stamps), copy_s, tensor_mb(kv), steps)


def build(spec: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    versions = {"transformers": version("transformers")}
    if spec["system"] == "tl":
        system: Any = TransformerLensSystem(spec["seed"])
        versions["transformer_lens"] = version("transformer-lens")
    elif spec["system"] == "hf":
        system = HuggingFaceSystem()
    else:
        raise ValueError(f"unknown peer system {spec['system']!r}; known: tl, hf")
    return system, {**versions, **param_info(system.model)}


if __name__ == "__main__":
    worker_main(json.loads(sys.argv[1]), build)
