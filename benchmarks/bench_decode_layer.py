"""A decode step with one native call per layer against the same kernels called op by op.

The op-by-op path is the one a block takes when a hook is attached to it; the native layer call
(``kvlens/kernels/layer.c``) is taken otherwise and gives bitwise the same result. For each
benchmark shape (random weights, batch 1, a 128-token context), the two are timed in alternating
rounds in one process, so that the machine's drifting memory speed affects both alike; each
round's figure is the median of ``--steps`` steps, and the table shows the medians over rounds.

Usage: .venv/bin/python benchmarks/bench_decode_layer.py [--threads 2] [--rounds 6]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import subprocess
from pathlib import Path

import torch

import kvlens.components.decode_plan as plan_module
from bench_matvec import median_seconds
from kvlens import HookedTransformer, KeyValueCache, ModelConfig
from model_shapes import SHAPES, TITLES


def step_times(shape_name: str, rounds: int, steps: int) -> tuple[list[float], list[float]]:
    """ms per decode step per round: (one native call per layer, op by op)."""
    cfg = ModelConfig(**SHAPES[shape_name], dtype=torch.float32)
    model = HookedTransformer(cfg).eval()
    tokens = torch.randint(0, cfg.d_vocab, (1, 128), generator=torch.Generator().manual_seed(0))
    cache = KeyValueCache.init_cache(cfg, None, 1, 256)
    layer_call = plan_module.decode_layer
    fused, ops = [], []
    with torch.no_grad():
        model(tokens, past_kv_cache=cache)
        last = tokens[:, -1:]

        def step() -> None:
            model(last, past_kv_cache=cache)
            cache.crop(-1)

        try:
            for _ in range(rounds):
                plan_module.decode_layer = layer_call
                fused.append(median_seconds(step, steps) * 1e3)
                plan_module.decode_layer = lambda *args, **kwargs: None  # type: ignore[assignment]
                ops.append(median_seconds(step, steps) * 1e3)
        finally:
            plan_module.decode_layer = layer_call
    return fused, ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    revision = subprocess.run(
        ["git", "-C", str(Path(__file__).parent), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(f"{now} at {revision or 'unknown'}, {args.threads} threads, {args.rounds} rounds\n")
    print("| shape | one call per layer, ms/step | op by op, ms/step | op by op ÷ one call |")
    print("|---|---:|---:|---:|")
    for shape_name in SHAPES:
        fused, ops = step_times(shape_name, args.rounds, args.steps)
        a, b = statistics.median(fused), statistics.median(ops)
        print(f"| {TITLES[shape_name]} | {a:.1f} | {b:.1f} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
