"""Worker of the generation benchmark for kvlens; ``bench_generate.py`` starts one per shape.

Systems: ``kvlens`` (random weights of the given shape) and ``kvlens-real`` (the real
SmolLM2-135M-Instruct weights, whose shape must match the given one). Generation is greedy
through ``HookedTransformer.generate_stream``, the loop ``generate`` runs, so each new token is
timed as it is yielded.

Usage (normally through bench_generate.py)::

    .venv/bin/python benchmarks/generate_kvlens.py '<JSON spec>'
"""

from __future__ import annotations

import time
from importlib.metadata import version
from typing import Any

import torch
from torch import Tensor

import kvlens
from generate_harness import System, Timing, main, module_info

# Fields the real model's config must share with the benchmark's SmolLM2 shape.
_CHECKED_FIELDS = ("n_layers", "d_model", "n_heads", "d_head", "d_vocab", "d_mlp", "act_fn")


def build_model(spec: dict[str, Any]) -> kvlens.HookedTransformer:
    shape = spec["shape"]
    if spec["system"] == "kvlens-real":
        model = kvlens.HookedTransformer.from_pretrained(progress=False)
        cfg = model.cfg
        wrong = [f for f in _CHECKED_FIELDS if getattr(cfg, f) != shape[f]]
        if cfg.n_kv_heads != (shape["n_key_value_heads"] or shape["n_heads"]):
            wrong.append("n_key_value_heads")
        if wrong:
            raise ValueError(f"the real model differs from shape {spec['shape_name']} in {wrong}")
    else:
        model = kvlens.HookedTransformer(kvlens.ModelConfig(**shape, dtype=torch.float32))
    return model.eval()


def build(spec: dict[str, Any]) -> System:
    model = build_model(spec)

    def generate(tokens: Tensor, n: int) -> Timing:
        stamps = []
        start = time.perf_counter()
        stream = model.generate_stream(tokens, max_new_tokens=n, do_sample=False, stop_at_eos=False)
        for _ in stream:
            stamps.append(time.perf_counter())
        return Timing(start, stamps, time.perf_counter())

    info = {"kvlens": version("kvlens"), "kvlens_file": kvlens.__file__, **module_info(model)}
    return System(generate, info)


if __name__ == "__main__":
    main(build)
