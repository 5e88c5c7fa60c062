"""Benchmark: a decode step's weight products on ggml blocks (Q4_1, Q8_0) beside fp32.

The products of one decode step of the SmolLM2-135M shape (every layer's q/k/v, output, gate/up
and down projections, and the unembedding), one row, as the default model's GGUF file stores
them (Q4_1 projections, a Q8_0 embedding that is also the output matrix), all in Q8_0, and in
fp32 with kvlens's fp32 kernel (``kernels.matmul``). Random weights: speed does not depend on
the values. Rounds alternate the three, at 1 and 2 threads; the table gives medians, the bytes
each reads and the rate, beside the machine's read rate (``floor.measure_read_bandwidth``)
measured in the same run, and each one's floor (bytes / read rate).

Usage::

    .venv/bin/python benchmarks/bench_qmatvec.py [--rounds 9] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch

import floor
from bench_generate import cpu_model
from kvlens import kernels
from kvlens.quantized import QuantizedMatrix
from model_shapes import SHAPES

HERE = Path(__file__).resolve().parent


def products(shape: dict) -> list[tuple[int, int]]:
    """``(d_out, d_in)`` of every product of one decode step, the unembedding last."""
    d, h, kv, dh, mlp = (
        shape["d_model"], shape["n_heads"], shape["n_key_value_heads"], shape["d_head"],
        shape["d_mlp"],
    )  # fmt: skip
    layer = [((h + 2 * kv) * dh, d), (d, h * dh), (2 * mlp, d), (d, mlp)]
    return layer * shape["n_layers"] + [(shape["d_vocab"], d)]


def step(mats: list, x: torch.Tensor, threads: int) -> float:
    start = time.perf_counter()
    for matrix in mats:
        if isinstance(matrix, QuantizedMatrix):
            kernels.quantized.qmatmul(x[:, : matrix.d_in], matrix.blocks, matrix.qtype,
                                      threads=threads)  # fmt: skip
        else:
            kernels.matmul(x[:, : matrix.shape[0]], matrix, threads=threads)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "qmatvec.json")
    args = parser.parse_args()
    if not kernels.available():
        raise SystemExit(f"native kernels: {kernels.describe()}")
    import kvlens.kernels.quantized  # noqa: F401  (kernels.quantized above)

    shape = SHAPES["smollm2-135m"]
    gen = torch.Generator().manual_seed(0)
    sizes = products(shape)
    dense = [torch.randn(d_in, d_out, generator=gen) for d_out, d_in in sizes]
    systems = {
        "fp32": dense,
        "q4_1 + q8_0 unembed (the GGUF file's)": [
            QuantizedMatrix.quantize(w.T, "q8_0" if i == len(sizes) - 1 else "q4_1")
            for i, w in enumerate(dense)
        ],
        "q8_0": [QuantizedMatrix.quantize(w.T, "q8_0") for w in dense],
    }
    nbytes = {
        name: sum(m.nbytes if isinstance(m, QuantizedMatrix) else m.numel() * 4 for m in mats)
        for name, mats in systems.items()
    }
    x = torch.randn(1, max(d_in for _, d_in in sizes), generator=gen)
    read_before = floor.measure_read_bandwidth()
    times: dict[str, dict[int, list[float]]] = {n: {1: [], 2: []} for n in systems}
    for _ in range(args.rounds):
        for threads in (1, 2):
            for name, mats in systems.items():
                step(mats, x, threads)  # warm
                times[name][threads].append(min(step(mats, x, threads) for _ in range(3)))
    read_after = floor.measure_read_bandwidth()
    read = statistics.median([read_before, read_after])
    rows = []
    for name in systems:
        for threads in (1, 2):
            ms = statistics.median(times[name][threads]) * 1e3
            rows.append({
                "system": name, "threads": threads, "ms": round(ms, 3),
                "mb": round(nbytes[name] / 1e6, 1),
                "gb_per_s": round(nbytes[name] / ms / 1e6, 2),
                "floor_ms": round(nbytes[name] / read * 1e3, 3),
            })  # fmt: skip
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "read_gb_per_s": [round(read_before / 1e9, 2), round(read_after / 1e9, 2)],
        "rounds": args.rounds,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"read rate {read / 1e9:.1f} GB/s (start, end: {result['read_gb_per_s']})")
    print("| weights | threads | ms per step's products | MB read | GB/s | floor ms | ÷ floor |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = r["ms"] / r["floor_ms"]
        print(f"| {r['system']} | {r['threads']} | {r['ms']:.2f} | {r['mb']:.0f} | "
              f"{r['gb_per_s']:.1f} | {r['floor_ms']:.2f} | {ratio:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
