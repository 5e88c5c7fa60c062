"""Worker of ``bench_interp.py`` for the peers: one scenario at one batch size, in a fresh process.

Runs in the peer's own virtual environment, never in kvlens's. Every system loads the benchmark's
weights folder (a Hugging Face Llama checkpoint) and generates greedily, fp32, no EOS stop:

- ``nnsight`` (``.nnsight-venv``): nnsight 0.8.1's ``TransformersModel(folder,
  task="text-generation")`` over transformers 4.57.6; ``with model.generate(tokens,
  max_new_tokens=n, do_sample=False) as tracer``, the interventions in ``for step in
  tracer.iter[:n]`` (``tracer.all()`` bounded to the ``n`` forward passes a generation of ``n``
  tokens makes, so the statements after the loop run), the tokens read from ``tracer.result``.
  Steering: ``layers[15].output = layers[15].output + vector``; recording: every layer's
  ``.output`` appended to a list made with ``nnsight.save``. No ``return_cache``.
- ``tl2`` (``.peer-venv``): TransformerLens 2.18 ``HookedTransformer`` built from the SmolLM2
  config and given the folder's weights through TransformerLens's own Llama converter, no weight
  processing (as kvlens's ``from_pretrained_no_processing``); ``generate(...,
  use_past_kv_cache=True)`` inside ``model.hooks(fwd_hooks=...)``. No ``return_cache``.
- ``tl4`` (``.tl4-venv``): TransformerLens 4.3.0 ``TransformerBridge.boot_transformers(folder,
  device="cpu")`` over transformers 5.24; ``generate`` inside ``model.hooks(fwd_hooks=...)``, and
  ``generate(return_cache=True, names_filter=...)``, which TransformerLens 4.3 implements as the
  generation followed by one ``run_with_cache`` over the whole output (batch 1 only: batched
  calls raise ``NotImplementedError``).

Usage (normally through bench_interp.py)::

    .nnsight-venv/bin/python benchmarks/peers/interp_peer.py '<JSON spec>'
"""

from __future__ import annotations

import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

# The shared harness lives one folder up; this script runs outside kvlens's environment.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from generate_peer import tl_config

from generate_harness import module_info
from interp_harness import (
    STEER_LAYER,
    InterpSystem,
    hooked_system,
    join,
    main,
    steering_vector,
)

NO_RETURN_CACHE = "no generate(return_cache=...) in this system"


def build_nnsight(spec: dict[str, Any], vector: Tensor) -> InterpSystem:
    import nnsight
    from nnsight.modeling.transformers import TransformersModel

    # dispatch=True: the weights are loaded now, not in the first (warm-up) call.
    model = TransformersModel(
        spec["folder"], task="text-generation", dtype=torch.float32, dispatch=True
    )
    hf = model._module
    layers = model.model.layers
    n_layers = len(hf.model.layers)

    def plain(tokens: Tensor, n: int) -> Tensor:
        with model.generate(tokens, max_new_tokens=n, do_sample=False) as tracer:
            out = tracer.result.save()
        return out

    def steer(tokens: Tensor, n: int) -> Tensor:
        with model.generate(tokens, max_new_tokens=n, do_sample=False) as tracer:
            for _ in tracer.iter[:n]:
                layers[STEER_LAYER].output = layers[STEER_LAYER].output + vector
            out = tracer.result.save()
        return out

    def record(tokens: Tensor, n: int) -> tuple[Tensor, list[list[Tensor]]]:
        with model.generate(tokens, max_new_tokens=n, do_sample=False) as tracer:
            kept = nnsight.save([[] for _ in range(n_layers)])
            for _ in tracer.iter[:n]:
                for i in range(n_layers):
                    kept[i].append(layers[i].output)
            out = tracer.result.save()
        return out, kept

    def full_resid(tokens: Tensor) -> list[Tensor]:
        with model.trace(tokens):
            got = nnsight.save([layers[i].output for i in range(n_layers)])
        return got

    run = {"plain": plain, "steer": steer, "record": record}
    skipped = {"cache": NO_RETURN_CACHE, "cache_all": NO_RETURN_CACHE}
    info = {
        "nnsight": version("nnsight"),
        "transformers": version("transformers"),
        **module_info(hf),
    }
    return InterpSystem(run, join, full_resid, info, skipped)


def build_tl2_model(spec: dict[str, Any]) -> nn.Module:
    """TransformerLens 2.18's HookedTransformer with the folder's weights, unprocessed."""
    from transformer_lens import HookedTransformer
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights
    from transformers import AutoTokenizer, LlamaForCausalLM

    cfg = tl_config(spec["shape"], original_architecture="LlamaForCausalLM")
    hf = LlamaForCausalLM.from_pretrained(spec["folder"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(spec["folder"])
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    model.load_and_process_state_dict(
        convert_llama_weights(hf, cfg),
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    return model.eval()


def build_tl(spec: dict[str, Any], vector: Tensor) -> InterpSystem:
    """TransformerLens 2.18 (``tl2``) or 4.3's TransformerBridge (``tl4``): the same hook API."""
    if spec["system"] == "tl2":
        model = build_tl2_model(spec)
    else:
        from transformer_lens.model_bridge import TransformerBridge

        model = TransformerBridge.boot_transformers(
            spec["folder"], device="cpu", dtype=torch.float32
        )
        model.eval()
    greedy = dict(do_sample=False, stop_at_eos=False, verbose=False, return_type="tokens")
    if spec["system"] == "tl2":
        greedy["use_past_kv_cache"] = True
    info = {
        "transformer_lens": version("transformer-lens"),
        "transformers": version("transformers"),
    }
    info.update(module_info(model))
    no_cache = None if spec["system"] == "tl4" else NO_RETURN_CACHE
    return hooked_system(model, spec["shape"]["n_layers"], vector, greedy, info, no_cache)


def build(spec: dict[str, Any]) -> InterpSystem:
    vector = steering_vector(spec["shape"]["d_model"], spec["seed"], spec["steer_scale"])
    if spec["system"] == "nnsight":
        return build_nnsight(spec, vector)
    if spec["system"] in ("tl2", "tl4"):
        return build_tl(spec, vector)
    raise ValueError(f"unknown peer system {spec['system']!r}; known: nnsight, tl2, tl4")


if __name__ == "__main__":
    main(build)
