"""Benchmark: the Python and dispatch cost of one decode step, for two kvlens revisions.

A decode step of a real model costs its weight reads (memory speed, which drifts on this machine
by ±20% over minutes) plus a fixed per-step cost of Python, dispatch and kernel calls. A change to
how a step is organised (the decode plan, the cache interface) changes only the second part, which
the generation benchmark cannot resolve under the drift. This script measures it directly: a model
30 layers deep (SmolLM2's depth and layout) but only 64 wide, so that the weights fit in cache and
the step is almost all fixed cost. Each round runs a fresh process per revision, alternating, and
times ``--steps`` single-token steps after a 128-token prompt; reported are the medians per step
and their ratio.

Usage::

    .venv/bin/python benchmarks/bench_step_overhead.py --baseline 6c40439 --candidate HEAD
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_baseline import extract_source
from bench_generate import cpu_model

WORKER = r"""
import json, statistics, sys, time
import torch
from kvlens import HookedTransformer, KeyValueCache, ModelConfig
torch.set_num_threads(int(sys.argv[1]))
steps = int(sys.argv[2])
cfg = ModelConfig(n_layers=30, d_model=64, n_heads=4, d_head=16, n_key_value_heads=2, d_mlp=128,
                  n_ctx=4096, d_vocab=256, act_fn="silu", normalization_type="RMS",
                  positional_embedding_type="rotary", gated_mlp=True, attn_qkv_bias=False,
                  attn_out_bias=False, mlp_bias=False)
torch.manual_seed(0)
model = HookedTransformer(cfg).eval()
times = []
with torch.inference_mode():
    cache = KeyValueCache.init_cache(cfg, None, 1, capacity=128 + steps + 64)
    model(torch.randint(0, 256, (1, 128)), past_kv_cache=cache)
    token = torch.tensor([[3]])
    for _ in range(64):
        model(token, past_kv_cache=cache)
    for _ in range(steps):
        start = time.perf_counter()
        model(token, past_kv_cache=cache)
        times.append(time.perf_counter() - start)
print(json.dumps({"us_per_step": 1e6 * statistics.median(times)}))
"""


def one_run(src: Path, threads: int, steps: int) -> float:
    out = subprocess.run(
        [sys.executable, "-c", WORKER, str(threads), str(steps)],
        env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return float(json.loads(out.strip().splitlines()[-1])["us_per_step"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", required=True)
    p.add_argument("--candidate", required=True)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    runs: dict[str, list[float]] = {"baseline": [], "candidate": []}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {
            "baseline": extract_source(args.baseline, Path(tmp) / "baseline"),
            "candidate": extract_source(args.candidate, Path(tmp) / "candidate"),
        }
        for index in range(args.rounds):
            order = ("baseline", "candidate") if index % 2 == 0 else ("candidate", "baseline")
            for name in order:
                runs[name].append(one_run(trees[name], args.threads, args.steps))
                print(f"round {index + 1} {name}: {runs[name][-1]:.0f} us/step", file=sys.stderr)
    median = {name: statistics.median(values) for name, values in runs.items()}
    result = {
        "started": started,
        "cpu": cpu_model(),
        "baseline": args.baseline,
        "candidate": args.candidate,
        "threads": args.threads,
        "steps": args.steps,
        "median_us_per_step": median,
        "candidate_over_baseline": median["candidate"] / median["baseline"],
        "runs": runs,
    }
    print(json.dumps(result, indent=1))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
