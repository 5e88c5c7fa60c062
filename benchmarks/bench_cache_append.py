"""Benchmark: appending tokens one at a time to a GPT-2-small-shaped key-value cache.

Compares kvlens's preallocated cache with a reference that grows by ``torch.cat`` on every append,
as TransformerLens 2.18's ``HookedTransformerKeyValueCache`` does. Each step appends one token's
attention mask and then one token's keys and values to every layer, as a decode step's forward
pass does; the attention itself is not run, so the numbers are the cache's own cost.

For each system and batch size it reports the total time, the time of the last 1,024 appends over
the time of the first 1,024 (a flat per-token cost gives about 1; a cost growing with the length
gives much more), and the reference's total over kvlens's. Prints a markdown table and writes
JSON (default ``benchmarks/results/cache_append.json``).

Usage::

    .venv/bin/python benchmarks/bench_cache_append.py [--tokens 8192] [--repeats 3]

The reference's total grows with the square of ``--tokens`` (each append copies the whole cache):
at 8,192 tokens one run took about 11 minutes at batch 1 on two cores, and its first 2,048 tokens
alone took 9 minutes at batch 8 (a full run there would take hours). So ``--reference-repeats``
defaults to 1, and ``--reference-budget-s`` stops a reference run after that many seconds of
appends; its total is then reported as a lower bound ("> x s") and so is the speed-up.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from kvlens import KeyValueCache, ModelConfig

GPT2_SMALL = ModelConfig(n_layers=12, d_model=768, n_heads=12, d_head=64, n_ctx=8192, d_vocab=50257)
DEFAULT_OUTPUT = Path(__file__).parent / "results" / "cache_append.json"


class CatCacheEntry:
    """Reference entry: ``[batch, pos, head, d_head]`` tensors replaced by a concatenation."""

    def __init__(self, cfg: ModelConfig, batch: int) -> None:
        shape = (batch, 0, cfg.n_kv_heads, cfg.d_head)
        self.past_keys = torch.empty(shape, dtype=cfg.dtype)
        self.past_values = torch.empty(shape, dtype=cfg.dtype)
        self.frozen = False

    def append(self, new_keys: Tensor, new_values: Tensor) -> tuple[Tensor, Tensor]:
        keys = torch.cat([self.past_keys, new_keys], dim=1)
        values = torch.cat([self.past_values, new_values], dim=1)
        if not self.frozen:
            self.past_keys, self.past_values = keys, values
        return keys, values


class CatCache:
    """Reference cache: one :class:`CatCacheEntry` per layer and a concatenated mask."""

    def __init__(self, cfg: ModelConfig, batch: int) -> None:
        self.entries = [CatCacheEntry(cfg, batch) for _ in range(cfg.n_layers)]
        self.previous_attention_mask = torch.empty((batch, 0), dtype=torch.int)
        self.frozen = False

    def append_attention_mask(self, mask: Tensor) -> Tensor:
        full = torch.cat([self.previous_attention_mask, mask], dim=-1)
        if not self.frozen:
            self.previous_attention_mask = full
        return full


SYSTEMS = {
    "kvlens": lambda cfg, batch: KeyValueCache.init_cache(cfg, "cpu", batch),
    "reference": CatCache,
}


# Progress is reported every this many tokens (a reference run at batch 8 takes hours).
PROGRESS_EVERY = 512


def step_times(
    system: str,
    cfg: ModelConfig,
    batch: int,
    tokens: int,
    budget_s: float | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Seconds taken by each one-token step on a fresh cache: ``tokens`` of them, or fewer if
    their sum passed ``budget_s`` first.

    ``progress(tokens_done, seconds_so_far)`` is called every ``PROGRESS_EVERY`` tokens.
    """
    gen = torch.Generator().manual_seed(0)
    shape = (batch, 1, cfg.n_kv_heads, cfg.d_head)
    new = [
        (torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))
        for _ in range(cfg.n_layers)
    ]
    mask = torch.ones((batch, 1), dtype=torch.long)
    cache = SYSTEMS[system](cfg, batch)
    entries = cache.entries
    gc.collect()
    times: list[float] = []
    spent = 0.0
    clock = time.perf_counter
    for _ in range(tokens):
        start = clock()
        cache.append_attention_mask(mask)
        for entry, (keys, values) in zip(entries, new, strict=True):
            entry.append(keys, values)
        times.append(clock() - start)
        spent += times[-1]
        if progress is not None and len(times) % PROGRESS_EVERY == 0:
            progress(len(times), spent)
        if budget_s is not None and spent > budget_s:
            break
    del cache, entries
    gc.collect()
    return times


def measure(
    system: str,
    batch: int,
    tokens: int,
    window: int,
    repeats: int,
    budget_s: float | None = None,
    progress: Callable[[dict], None] | None = None,
) -> dict:
    """Median over ``repeats`` runs of the total, first-window and last-window times.

    A run stopped by ``budget_s`` ends the measurement: its total is then a lower bound on the
    full run's (``complete`` is false) and the last window is unknown.
    """
    totals, firsts, lasts, last_steps = [], [], [], []
    tokens_done = tokens
    for run in range(repeats):

        def report(done: int, seconds: float, run: int = run) -> None:
            if progress is not None:
                state = {"system": system, "batch": batch, "run": run, "tokens_done": done}
                progress({**state, "seconds_so_far": seconds, "loadavg": os.getloadavg()})

        times = step_times(system, GPT2_SMALL, batch, tokens, budget_s, report)
        totals.append(sum(times))
        firsts.append(sum(times[:window]))
        if len(times) < tokens:
            tokens_done = len(times)
            break
        lasts.append(sum(times[-window:]))
        last_steps.append(statistics.median(times[-window:]))
    complete = tokens_done == tokens
    first = statistics.median(firsts) if tokens_done >= window else None
    last = statistics.median(lasts) if complete else None
    return {
        "system": system,
        "batch": batch,
        "tokens": tokens,
        "complete": complete,
        "tokens_done": tokens_done,
        "repeats": len(totals),
        # With complete false: the time of the first tokens_done appends, a lower bound.
        "total_s": statistics.median(totals) if complete else totals[-1],
        "totals_s": totals,
        "first_window_s": first,
        "last_window_s": last,
        "last_over_first": last / first if last is not None and first else None,
        "median_last_window_step_us": (1e6 * statistics.median(last_steps) if complete else None),
        # Other work on the machine shows up here; the numbers are only as quiet as the machine.
        "loadavg_after": os.getloadavg(),
    }


def check_agreement(tokens: int = 40, batch: int = 2) -> None:
    """Both systems must hold the same keys, values and mask before their speed means anything."""
    cfg = GPT2_SMALL.replace(n_layers=2)
    gen = torch.Generator().manual_seed(1)
    caches = [KeyValueCache.init_cache(cfg, "cpu", batch), CatCache(cfg, batch)]
    for _ in range(tokens):
        mask = torch.randint(0, 2, (batch, 1), generator=gen)
        kv = [torch.randn(batch, 1, cfg.n_heads, cfg.d_head, generator=gen) for _ in range(4)]
        for cache in caches:
            cache.append_attention_mask(mask)
            for layer, entry in enumerate(cache.entries):
                entry.append(kv[2 * layer], kv[2 * layer + 1])
    ours, ref = caches
    assert torch.equal(ours.previous_attention_mask, ref.previous_attention_mask)
    for a, b in zip(ours.entries, ref.entries, strict=True):
        assert torch.equal(a.past_keys, b.past_keys)
        assert torch.equal(a.past_values, b.past_values)


def markdown_table(results: list[dict], window: int) -> str:
    """Results as a markdown table; a run stopped by its budget shows its total as a bound."""
    reference = {r["batch"]: r for r in results if r["system"] != "kvlens"}
    lines = [
        f"| system | batch | tokens | runs | total (s) | first {window} (s) | last {window} (s) "
        "| last / first | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ref = reference.get(r["batch"])
        bound = "" if r["complete"] else "> "
        total = f"{bound}{r['total_s']:.2f}"
        if not r["complete"]:
            total += f" (stopped at token {r['tokens_done']})"
        first = "n/a" if r["first_window_s"] is None else f"{r['first_window_s']:.3f}"
        last = "n/a" if r["last_window_s"] is None else f"{r['last_window_s']:.3f}"
        ratio = "n/a" if r["last_over_first"] is None else f"{r['last_over_first']:.2f}"
        if ref is None or ref is r:
            speedup = "n/a"
        else:
            ref_bound = "" if ref["complete"] else "> "
            speedup = f"{ref_bound}{ref['total_s'] / r['total_s']:.1f}x"
        lines.append(
            f"| {r['system']} | {r['batch']} | {r['tokens']} | {r['repeats']} | {total} "
            f"| {first} | {last} | {ratio} | {speedup} |"
        )
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192, help="tokens appended per run")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes")
    parser.add_argument("--repeats", type=int, default=3, help="kvlens runs (median reported)")
    parser.add_argument(
        "--reference-repeats",
        type=int,
        default=1,
        help="reference runs (median reported); each costs O(tokens^2)",
    )
    parser.add_argument(
        "--reference-budget-s",
        type=float,
        default=None,
        help="stop a reference run once its appends took this long (its total is then a bound)",
    )
    parser.add_argument(
        "--systems", nargs="+", choices=list(SYSTEMS), default=list(SYSTEMS), help="what to run"
    )
    parser.add_argument("--window", type=int, default=1024, help="tokens in the first/last window")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results file")
    args = parser.parse_args(argv)
    if args.tokens < 2 * args.window:
        parser.error(f"--tokens must be >= 2 * --window = {2 * args.window}, got {args.tokens}")

    torch.set_num_threads(args.threads)
    check_agreement()
    meta = {
        "benchmark": "cache_append",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "threads": args.threads,
        "dtype": "float32",
        "model_shape": "GPT-2 small: 12 layers, 12 heads, d_head 64",
        "window": args.window,
        "loadavg_before": os.getloadavg(),
    }
    results: list[dict] = []

    def save(in_progress: dict | None = None) -> None:
        # Written often, so that a long run that is stopped keeps what it measured.
        data = {"meta": meta, "results": results}
        if in_progress is not None:
            data["in_progress"] = in_progress
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(data, indent=2) + "\n")

    for batch in args.batch:
        for system in args.systems:
            repeats = args.reference_repeats if system != "kvlens" else args.repeats
            budget = args.reference_budget_s if system != "kvlens" else None
            result = measure(system, batch, args.tokens, args.window, repeats, budget, save)
            results.append(result)
            print(
                f"{system} batch {batch}: {result['tokens_done']} tokens in "
                f"{result['total_s']:.2f} s",
                file=sys.stderr,
                flush=True,
            )
            save()
    print(markdown_table(results, args.window))


if __name__ == "__main__":
    main()
