"""Where a kvlens decode step's time goes: single-row matrix products by weight layout and kernel.

Prints, for each weight shape of SmolLM2-135M (and its unembedding), the effective read bandwidth
of a one-row product under each layout and call (kvlens's native kernel, MKL through torch, numpy),
the machine's read bandwidth (a large ``sum``), and then the time of a whole decode step of the
real model (with one native call per layer, with kvlens's native kernels op by op as a hooked
block runs, and with torch alone) beside the time of its matrix products alone. Small matrices
are cycled through many copies so that they are read from memory, not from the caches, as in a
real decode step.

Usage: .venv/bin/python benchmarks/bench_matvec.py [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import kvlens.components.block as block_module
from kvlens import HookedTransformer, KeyValueCache, kernels
from kvlens.kernels import build

SHAPES = [(49152, 576), (960, 576), (3072, 576), (576, 1536), (576, 576)]  # (out, in)


def median_seconds(fn: Callable[[], object], runs: int = 30) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def layouts(out_features: int, in_features: int) -> dict[str, float]:
    """GB/s of weight read per second for each way of computing one row's product."""
    nbytes = out_features * in_features * 4
    copies = max(1, min(60, int(600e6 // nbytes)))
    weights = [torch.randn(out_features, in_features) for _ in range(copies)]  # [out, in]
    transposed = [w.t().contiguous() for w in weights]  # [in, out]
    arrays = [w.numpy() for w in weights]
    x = torch.randn(1, in_features)
    xv, xn = x[0], x[0].numpy()
    calls: dict[str, Callable[[], object]] = {
        "kvlens native W[in,out]": lambda: [kernels.matmul(x, w) for w in transposed],
        "x @ W[in,out] (MKL)": lambda: [x @ w for w in transposed],
        "F.linear W[out,in]": lambda: [torch.nn.functional.linear(x, w) for w in weights],
        "torch.mv W[out,in]": lambda: [torch.mv(w, xv) for w in weights],
        "numpy W[out,in] @ x": lambda: [w @ xn for w in arrays],
    }
    return {name: nbytes * copies / median_seconds(fn) / 1e9 for name, fn in calls.items()}


def read_bandwidth() -> float:
    """GB/s of a large ``sum`` (600 MB): what the memory gives a streaming read."""
    big = torch.randn(150_000_000)
    seconds = median_seconds(lambda: big.sum(), 10)
    return big.numel() * 4 / seconds / 1e9


def step_weights(model: HookedTransformer) -> list[torch.Tensor]:
    """Every weight matrix a decode step multiplies by: the unembedding and 4 per layer."""
    weights = [model.unembed.W_U.detach()]
    for block in model.blocks:
        mats = (block.attn.W_QKV, block.attn.W_O_flat, block.mlp.W_gate_in, block.mlp.W_out)
        weights += [w.detach() for w in mats]
    return weights


def decode_step_split(model: HookedTransformer) -> dict[str, float]:
    """Decode step and matrix-product times (ms) of the real SmolLM2 at a 40-token context."""
    tokens = model.to_tokens("The capital of France is a city of many bridges")
    cache = KeyValueCache.init_cache(model.cfg, None, 1, 256)
    weights = step_weights(model)
    rows = {w.shape[0]: torch.randn(1, w.shape[0]) for w in weights}
    with torch.no_grad():
        model(tokens, past_kv_cache=cache)
        last = tokens[:, -1:]

        def step() -> None:
            model(last, past_kv_cache=cache)
            cache.crop(-1)

        def matmuls_mkl() -> None:
            for w in weights:
                rows[w.shape[0]] @ w

        def matmuls_native() -> None:
            for w in weights:
                kernels.matmul(rows[w.shape[0]], w)

        result = {"weights_mb": sum(w.numel() * 4 for w in weights) / 1e6}
        result["step_native_ms"] = median_seconds(step, 20) * 1e3
        # The same kernels called op by op: the path a block with a hook attached takes.
        layer_call = block_module.decode_layer
        block_module.decode_layer = lambda *args, **kwargs: None  # type: ignore[assignment]
        try:
            result["step_ops_ms"] = median_seconds(step, 20) * 1e3
        finally:
            block_module.decode_layer = layer_call
        result["matmuls_native_ms"] = median_seconds(matmuls_native, 20) * 1e3
        result["matmuls_mkl_ms"] = median_seconds(matmuls_mkl, 20) * 1e3
        lib = build._state.get("lib")
        build._state["lib"] = None  # torch alone, as on a machine without a C compiler
        try:
            result["step_torch_ms"] = median_seconds(step, 20) * 1e3
        finally:
            build._state["lib"] = lib
    return result


def products_by_rows(model_weights: list[torch.Tensor]) -> dict[int, tuple[float, float]]:
    """ms for all of a decode step's products at 8-64 rows: (native kernel, MKL)."""
    out: dict[int, tuple[float, float]] = {}
    lib = build.library()
    assert lib is not None
    scratch = torch.empty(64 * max(w.shape[1] for w in model_weights))
    for rows in (8, 16, 32, 64):
        xs = {w.shape[0]: torch.randn(rows, w.shape[0]) for w in model_weights}
        results = {w.shape: torch.empty(rows, w.shape[1]) for w in model_weights}

        def native(rows: int = rows, xs: dict = xs, results: dict = results) -> None:
            for w in model_weights:
                k, n = w.shape
                lib.kvlens_matmul_small(
                    rows,
                    k,
                    n,
                    xs[k].data_ptr(),
                    k,
                    w.data_ptr(),
                    None,
                    results[w.shape].data_ptr(),
                    scratch.data_ptr(),
                    torch.get_num_threads(),
                )

        def mkl(xs: dict = xs, results: dict = results) -> None:
            for w in model_weights:
                torch.mm(xs[w.shape[0]], w, out=results[w.shape])

        out[rows] = (median_seconds(native, 5) * 1e3, median_seconds(mkl, 5) * 1e3)
    return out


def paired_rounds(weights: list[torch.Tensor], rounds: int = 9) -> list[tuple[float, float]]:
    """Per round: GB/s of a 512 MB ``sum``, then of all a step's products (native, one row).

    The machine's memory bandwidth drifts with the load of the host it shares, so the products'
    share of what the memory gives is read within a round, the two measured back to back.
    """
    big = torch.ones(2**27)
    rows = {w.shape[0]: torch.randn(1, w.shape[0]) for w in weights}
    nbytes = sum(w.numel() * 4 for w in weights)

    def products() -> None:
        for w in weights:
            kernels.matmul(rows[w.shape[0]], w)

    out = []
    for _ in range(rounds):
        read = big.numel() * 4 / median_seconds(lambda: big.sum(), 7) / 1e9
        out.append((read, nbytes / median_seconds(products, 7) / 1e9))
    return out


def attention_by_context() -> dict[int, tuple[float, float]]:
    """µs of one layer's decode attention (SmolLM2's 9 heads over 3): (native, SDPA folded)."""
    out: dict[int, tuple[float, float]] = {}
    for keys in (128, 1024, 4096):
        q = torch.randn(1, 1, 9, 64).transpose(1, 2)
        k, v = torch.randn(1, 3, keys, 64), torch.randn(1, 3, keys, 64)
        folded = q.reshape(1, 3, 3, 64)
        native = median_seconds(
            lambda q=q, k=k, v=v: kernels.decode_attention(q, k, v, scale=q.shape[-1] ** -0.5), 200
        )
        sdpa = median_seconds(
            lambda f=folded, k=k, v=v: torch.nn.functional.scaled_dot_product_attention(f, k, v),
            200,
        )
        out[keys] = (native * 1e6, sdpa * 1e6)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = None
    for out_features, in_features in SHAPES:
        result = layouts(out_features, in_features)
        if names is None:
            names = list(result)
            print("| weight [out, in] | " + " | ".join(names) + " |")
            print("|---|" + "---:|" * len(names))
        cells = " | ".join(f"{result[n]:.1f} GB/s" for n in names)
        print(f"| {out_features} x {in_features} | {cells} |")
    if not kernels.available():
        raise SystemExit("kvlens's native kernels are not available here (no C compiler?)")
    print(f"\nRead bandwidth (a 600 MB sum): {read_bandwidth():.1f} GB/s")
    model = HookedTransformer.from_pretrained(progress=False)
    split = decode_step_split(model)
    mb = split["weights_mb"]
    print(
        f"SmolLM2-135M decode step (batch 1, 40-token context): {split['step_native_ms']:.1f} ms "
        f"with one native call per layer, {split['step_ops_ms']:.1f} ms with the native kernels "
        f"op by op (a hooked block's path), {split['step_torch_ms']:.1f} ms with torch alone. Its "
        f"matrix products alone ({mb:.0f} MB of weights): {split['matmuls_native_ms']:.1f} ms "
        f"native ({mb / split['matmuls_native_ms']:.1f} GB/s), {split['matmuls_mkl_ms']:.1f} ms "
        f"MKL ({mb / split['matmuls_mkl_ms']:.1f} GB/s)"
    )
    weights = step_weights(model)
    pairs = paired_rounds(weights)
    print("\nRead bandwidth and the step's one-row products, back to back (GB/s), per round:")
    print("  " + ", ".join(f"{read:.1f} / {prod:.1f}" for read, prod in pairs))
    share = statistics.median(prod / read for read, prod in pairs)
    print(f"  median share of the read bandwidth the products reach: {share:.2f}")
    print("\nAll of SmolLM2's decode-step products at several rows (ms): native kernel / MKL")
    for rows, (native_ms, mkl_ms) in products_by_rows(weights).items():
        print(f"  {rows} rows: {native_ms:.1f} / {mkl_ms:.1f}")
    print("\nOne layer's attention of one query (9 heads over 3 kv heads, d_head 64), µs:")
    print("native kernel / scaled_dot_product_attention with the heads folded")
    for keys, (native_us, sdpa_us) in attention_by_context().items():
        print(f"  {keys} keys: {native_us:.0f} / {sdpa_us:.0f}")


if __name__ == "__main__":
    main()
