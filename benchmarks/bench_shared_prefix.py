"""Benchmark: N continuations of one long prompt, with the prompt's cache shared or copied.

A ``--prefix``-token prompt (default 2,048) is prefilled once at batch 1; then ``N`` rows each
continue it with their own ``--suffix`` tokens (default 64) and decode ``--steps`` greedy
tokens (default 64). Model: SmolLM2-135M's shape (30 layers, d_model 576, 9 query heads over 3
key/value heads, d_mlp 1,536, vocabulary 49,152, rotary base 100,000, RMSNorm) with random
weights, fp32, ``--threads`` CPU threads (default 2). Systems:

- ``kvlens-shared``: the frozen batch-1 prefix shared by the rows (``SharedPrefixCache``):
  stored once, read once per step for all rows (cascade attention);
- ``kvlens-copied``: the prefix's keys and values copied into a batch-N ``KeyValueCache``;
- ``tl``: TransformerLens 2.18, its batch-1 ``HookedTransformerKeyValueCache`` repeated to batch
  N, then its forward pass over that cache in a greedy loop (TL 2.18's ``generate`` cannot start
  from a given cache);
- ``hf``: transformers 4.57.6 ``LlamaForCausalLM`` (SDPA attention, tied embeddings as SmolLM2
  ships): the prompt's ``DynamicCache`` deep-copied and repeated per row
  (``batch_repeat_interleave``), then ``generate(past_key_values=...)``.

Each configuration runs in a fresh process (kvlens's in this environment, the peers' in
``.peer-venv``, see ``peers/make-peer-venv.sh``); what a run times and how memory is measured is
described in ``shared_prefix_harness.py``. Runs repeat up to ``--repeats`` times while within
``--budget`` seconds; a configuration still running after ``--timeout`` seconds is stopped and
recorded as such, and one whose copies of the prefix would not fit in the available memory is
skipped. Prints a markdown table and writes JSON (default
``benchmarks/results/shared_prefix.json``). The numbers mean something only on an otherwise idle
machine (the load average is recorded with every configuration).

Usage::

    .venv/bin/python benchmarks/bench_shared_prefix.py [--prefix 2048] [--n 1 8 32 64]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kvlens import HookedTransformer, KeyValueCache, KeyValueCacheEntry, ModelConfig
from kvlens.cache.shared import SharedPrefixCache
from kvlens.generate import decode_step, last_position_logits
from shared_prefix_harness import SMOLLM2, Run, stamps_to_run, worker_main
from worker_process import PREFIX

HERE = Path(__file__).resolve().parent
DEFAULT_OUTPUT = HERE / "results" / "shared_prefix.json"
DEFAULT_PEER_PYTHON = HERE.parent / ".peer-venv" / "bin" / "python"
SYSTEMS = ("kvlens-shared", "kvlens-copied", "tl", "hf")


def smollm2_config(**changes: Any) -> ModelConfig:
    fields = dict(
        n_layers=SMOLLM2["n_layers"],
        d_model=SMOLLM2["d_model"],
        n_heads=SMOLLM2["n_heads"],
        n_key_value_heads=SMOLLM2["n_key_value_heads"],
        d_head=SMOLLM2["d_head"],
        d_mlp=SMOLLM2["d_mlp"],
        d_vocab=SMOLLM2["d_vocab"],
        n_ctx=SMOLLM2["n_ctx"],
        rotary_base=SMOLLM2["rotary_base"],
        eps=SMOLLM2["eps"],
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        gated_mlp=True,
        attn_qkv_bias=False,
        attn_out_bias=False,
        mlp_bias=False,
    )
    fields.update(changes)
    return ModelConfig(**fields)


def copy_prefix(prefix: KeyValueCache, rows: int, capacity: int) -> KeyValueCache:
    """A batch-``rows`` cache holding a copy of the batch-1 ``prefix`` in every row."""
    entries = [
        KeyValueCacheEntry(
            entry.past_keys.expand(rows, -1, -1, -1),
            entry.past_values.expand(rows, -1, -1, -1),
            capacity=capacity,
        )
        for entry in prefix
    ]
    return KeyValueCache(entries, prefix.previous_attention_mask.expand(rows, -1))


class KvlensSystem:
    """kvlens's prefill and decode step (``kvlens.generate``) over a shared or copied prefix."""

    def __init__(self, model: HookedTransformer, shared: bool) -> None:
        self.model = model
        self.shared = shared

    def prefill_prefix(self, prefix: Tensor) -> KeyValueCache:
        return self.model.prefill(prefix).freeze()

    def rows_cache(
        self, prefix: KeyValueCache, rows: int, room: int
    ) -> KeyValueCache | SharedPrefixCache:
        if self.shared:
            return SharedPrefixCache.from_prefix(prefix, rows, capacity=room)
        return copy_prefix(prefix, rows, prefix.seq_len + room)

    def run(self, state: KeyValueCache, suffixes: Tensor, steps: int) -> Run:
        clock = time.perf_counter
        started = clock()
        cache = self.rows_cache(state, suffixes.shape[0], suffixes.shape[1] + steps + 1)
        copy_s = clock() - started
        start = clock()
        token = last_position_logits(self.model, suffixes, None, cache).argmax(-1)
        stamps = [clock()]
        for _ in range(steps):
            token = decode_step(self.model, token, cache).argmax(-1)
            stamps.append(clock())
        run = stamps_to_run(start, stamps, copy_s, cache.nbytes / 1e6, steps)
        if isinstance(cache, SharedPrefixCache):
            run.extra["prefix_cache_mb"] = cache.prefix.nbytes / 1e6
        return run


def build_kvlens(spec: dict[str, Any]) -> tuple[KvlensSystem, dict[str, Any]]:
    model = HookedTransformer(smollm2_config()).eval()
    n_params = sum(p.numel() for p in model.parameters())
    system = KvlensSystem(model, shared=spec["system"] == "kvlens-shared")
    return system, {"n_params": n_params, "weights_mb": 4 * n_params / 1e6}


@torch.inference_mode()
def check_agreement() -> None:
    """Shared and copied prefixes must give the same logits before their speed means anything."""
    cfg = smollm2_config(n_layers=2, d_model=64, n_heads=3, d_head=16, d_mlp=96, d_vocab=128)
    torch.manual_seed(0)
    model = HookedTransformer(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    prefix = model.prefill(torch.randint(0, 128, (1, 40), generator=gen)).freeze()
    suffixes = torch.randint(0, 128, (5, 6), generator=gen)
    caches = [SharedPrefixCache.from_prefix(prefix, 5), copy_prefix(prefix, 5, 60)]
    logits = [last_position_logits(model, suffixes, None, cache) for cache in caches]
    for _ in range(4):
        token = logits[1].argmax(-1)
        assert torch.allclose(logits[0], logits[1], atol=1e-4), "shared and copied disagree"
        logits = [decode_step(model, token, cache) for cache in caches]


# Orchestration --------------------------------------------------------------------------------


def prefix_cache_bytes(prefix: int) -> int:
    """Bytes of the prefix's keys and values, fp32, for one row."""
    per_token = 2 * SMOLLM2["n_layers"] * SMOLLM2["n_key_value_heads"] * SMOLLM2["d_head"] * 4
    return prefix * per_token


def available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def memory_reason(system: str, n: int, prefix: int) -> str | None:
    """Why a configuration cannot fit in memory now, or None."""
    if system == "kvlens-shared":
        return None
    # The copies, with room for growth and the transient copies of concatenating caches, plus the
    # weights and the runtime.
    needed = 1.3 * n * prefix_cache_bytes(prefix) + 2e9
    available = available_bytes()
    if available is not None and needed > available:
        return f"needs about {needed / 1e9:.1f} GB, {available / 1e9:.1f} GB available"
    return None


def run_config(system: str, spec: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Run one configuration in a fresh process and collect its records."""
    result: dict[str, Any] = {"system": system, "n": spec["n"], "loadavg_before": os.getloadavg()}
    reason = memory_reason(system, spec["n"], spec["prefix"])
    if reason is not None:
        return {**result, "status": "skipped", "reason": reason}
    if system.startswith("kvlens"):
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    else:
        script = HERE / "peers" / "shared_prefix_peer.py"
        command = [str(args.peer_python), str(script), json.dumps(spec)]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = process.communicate(timeout=args.timeout)
        status = "ok" if process.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        status = "timeout"
    records = [
        json.loads(line[len(PREFIX) :]) for line in out.splitlines() if line.startswith(PREFIX)
    ]
    result.update(status=status, wall_s=time.perf_counter() - started)
    if status == "failed":
        result["reason"] = err.strip().splitlines()[-1] if err.strip() else "no output"
    if status == "timeout":
        result["reason"] = f"still running after {args.timeout} s"
    runs = [r for r in records if r["kind"] == "run"]
    for record in records:
        if record["kind"] in ("info", "prefix", "memory"):
            result.update({k: v for k, v in record.items() if k != "kind"})
    result["runs"] = runs
    for key in ("copy_s", "prefill_s", "decode_ms", "total_s", "cache_mb", "prefix_cache_mb"):
        values = [r[key] for r in runs if key in r]
        if values:
            result[key] = statistics.median(values)
    result["loadavg_after"] = os.getloadavg()
    return result


def fmt(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "n/a"


def markdown_table(results: list[dict[str, Any]]) -> str:
    copied = {r["n"]: r.get("decode_ms") for r in results if r["system"] == "kvlens-copied"}
    lines = [
        "| system | N | runs | copy (s) | suffix prefill (s) | decode (ms/step) | total (s) "
        "| KV cache (MB) | peak RSS (MB) | decode vs kvlens-copied |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r["status"] != "ok" and not r.get("runs"):
            lines.append(f"| {r['system']} | {r['n']} | {r['status']}: {r.get('reason', '')} |")
            continue
        base, ms = copied.get(r["n"]), r.get("decode_ms")
        ratio = f"{base / ms:.1f}x" if base and ms else "n/a"
        cache = fmt(r.get("cache_mb"), ".0f")
        if "prefix_cache_mb" in r:
            cache += f" (prefix {r['prefix_cache_mb']:.0f})"
        cells = [
            r["system"],
            str(r["n"]),
            str(len(r["runs"])),
            fmt(r.get("copy_s"), ".2f"),
            fmt(r.get("prefill_s"), ".2f"),
            fmt(ms, ".1f"),
            fmt(r.get("total_s"), ".1f"),
            cache,
            fmt(r.get("peak_rss_mb"), ".0f"),
            ratio,
        ]
        lines.append("| " + " | ".join(cells) + " |")
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
    parser.add_argument("--prefix", type=int, default=2048, help="prompt tokens shared by all rows")
    parser.add_argument("--suffix", type=int, default=64, help="each row's own prompt tokens")
    parser.add_argument("--steps", type=int, default=64, help="decode steps after the prefill")
    parser.add_argument("--n", type=int, nargs="+", default=[1, 8, 32, 64], help="rows")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration at most")
    parser.add_argument("--budget", type=float, default=180.0, help="seconds of runs per config")
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="seconds before a config is stopped"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every worker")
    parser.add_argument("--peer-python", type=Path, default=DEFAULT_PEER_PYTHON)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        worker_main(json.loads(args.worker), build_kvlens)
        return
    if any(s in ("tl", "hf") for s in args.systems) and not args.peer_python.exists():
        parser.error(f"{args.peer_python} is missing: run benchmarks/peers/make-peer-venv.sh")
    check_agreement()
    meta = {
        "benchmark": "shared_prefix",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "threads": args.threads,
        "dtype": "float32",
        "model_shape": "SmolLM2-135M: 30 layers, d_model 576, 9 heads, 3 kv heads, d_head 64",
        "prefix": args.prefix,
        "suffix": args.suffix,
        "steps": args.steps,
        "memory_method": "peak RSS (VmHWM) of a fresh process per configuration, reset after "
        "the prefix prefill and a warm-up run",
    }
    results: list[dict[str, Any]] = []
    for n in args.n:
        for system in args.systems:
            spec = {
                "system": system,
                "n": n,
                "prefix": args.prefix,
                "suffix": args.suffix,
                "steps": args.steps,
                "repeats": args.repeats,
                "budget_s": args.budget,
                "threads": args.threads,
                "seed": 0,
            }
            result = run_config(system, spec, args)
            results.append(result)
            print(
                f"{system} N={n}: {result['status']}, decode "
                f"{fmt(result.get('decode_ms'), '.1f')} ms/step, total "
                f"{fmt(result.get('total_s'), '.1f')} s",
                file=sys.stderr,
                flush=True,
            )
            # Written after every configuration so a stopped run keeps what it measured.
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(markdown_table(results))


if __name__ == "__main__":
    main()
