"""Benchmark: a sliding-window layer's decode time and a bounded cache's memory against context.

SmolLM2-135M's shape with random weights, run twice with the same weights: every layer global,
and every layer local with a sliding window of ``--window`` keys (as Mistral's config sets it).
For each context length the cache is filled with random keys and values (decode time depends on
how many are read, not on their values), then ``--steps`` decode steps of batch 1 are timed one
by one; the median is reported. A windowed layer reads only its window, so its decode time should
stay flat beyond the window while the global model's grows with the context.

Memory: a bounded cache (``KeyValueCache.init_cache(..., bounded=True)``) and an unbounded one
are run through ``--memory-context`` real tokens (prefill in chunks, then decode steps), and their
storage bytes (``cache.nbytes``) reported.

Usage::

    .venv/bin/python benchmarks/bench_window.py --out benchmarks/results/window.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench_generate import cpu_model, git_revision
from kvlens import HookedTransformer, KeyValueCache, ModelConfig
from model_shapes import SHAPES


def model(window: int | None) -> HookedTransformer:
    fields = dict(SHAPES["smollm2-135m"], n_ctx=16384)
    cfg = ModelConfig(**fields, window_size=window)
    torch.manual_seed(0)
    return HookedTransformer(cfg).eval()


def filled_cache(m: HookedTransformer, context: int, steps: int) -> KeyValueCache:
    """A batch-1 cache holding ``context`` random positions, with room for ``steps`` more."""
    cfg = m.cfg
    cache = KeyValueCache.init_cache(cfg, None, 1, capacity=context + steps)
    gen = torch.Generator().manual_seed(1)
    for entry in cache:
        shape = (1, context, cfg.n_kv_heads, cfg.d_head)
        entry.append(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))
    cache.append_attention_mask(torch.ones(1, context, dtype=torch.long))
    return cache


def decode_ms(m: HookedTransformer, context: int, steps: int) -> float:
    cache = filled_cache(m, context, steps)
    token = torch.tensor([[7]])
    times = []
    with torch.inference_mode():
        m(token, past_kv_cache=cache)  # warm up
        for _ in range(steps):
            start = time.perf_counter()
            m(token, past_kv_cache=cache)
            times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def memory(m: HookedTransformer, context: int, bounded: bool) -> dict[str, int]:
    cache = KeyValueCache.init_cache(m.cfg, None, 1, bounded=bounded)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, m.cfg.d_vocab, (1, context), generator=gen)
    chunk = 1024
    with torch.inference_mode():
        for at in range(0, context - 64, chunk):
            m(ids[:, at : min(at + chunk, context - 64)], past_kv_cache=cache)
        for at in range(cache.seq_len, context):
            m(ids[:, at : at + 1], past_kv_cache=cache)
    return {"seq_len": cache.seq_len, "nbytes": cache.nbytes, "nbytes_used": cache.nbytes_used}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--memory-context", type=int, default=8192)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    windowed, plain = model(args.window), model(None)
    rows = []
    for context in args.contexts:
        row = {
            "context": context,
            "global_ms": decode_ms(plain, context, args.steps),
            "windowed_ms": decode_ms(windowed, context, args.steps),
        }
        rows.append(row)
        print(
            f"context {context}: all global {row['global_ms']:.2f} ms/step, window "
            f"{args.window} {row['windowed_ms']:.2f} ms/step",
            file=sys.stderr,
        )
    mem = {
        "bounded": memory(windowed, args.memory_context, bounded=True),
        "unbounded": memory(windowed, args.memory_context, bounded=False),
    }
    result: dict[str, Any] = {
        "started": started,
        "cpu": cpu_model(),
        "revision": git_revision(),
        "threads": args.threads,
        "window": args.window,
        "steps": args.steps,
        "decode": rows,
        "memory": mem,
    }
    print(json.dumps(result, indent=1))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
