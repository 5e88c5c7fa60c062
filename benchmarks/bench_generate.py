"""Benchmark: greedy generation in kvlens, TransformerLens 2.18 and transformers 4.57.6, in one run,
beside the physical floor of a decode step.

Systems, all fp32 on the CPU with the same thread count, each in a fresh subprocess per model
shape (it builds the model once, runs the grid, smallest configuration first, then the sweep):

- ``kvlens``: ``kvlens.HookedTransformer`` with random weights (``generate_kvlens.py``);
- ``kvlens-real``: kvlens on the real SmolLM2-135M-Instruct weights (SmolLM2 shape only);
- ``tl``: TransformerLens 2.18 ``generate(use_past_kv_cache=True)`` (``peers/generate_peer.py``,
  in the peers' virtual environment, ``peers/make-peer-venv.sh``);
- ``hf-dynamic`` and ``hf-static``: transformers 4.57.6 ``generate`` with ``DynamicCache`` and
  with ``cache_implementation="static"``.

Shapes (``model_shapes.py``): GPT-2 small and SmolLM2-135M, random weights. For each shape,
batch and prompt length the grid reports prefill ms, decode ms/step (prefill excluded), tokens
per second and peak memory (``generate_harness.py`` says how each is measured), each the median
of up to ``--repeats`` runs (fewer where another run would pass ``--config-budget``; the count is
recorded). The sweep reports decode ms/step at each context length (batch 1, a prefill of that
length, then ``--sweep-steps`` steps, their median). The floor's rates (``floor.py``) are
measured at the start and the end of the run.

Writes JSON (default ``benchmarks/results/generate.json``, rewritten after every worker so an
interrupted run keeps what it measured) and prints the tables; ``render_generate.py`` turns the
JSON into the markdown report and the plot.

Usage::

    .venv/bin/python benchmarks/bench_generate.py            # the full run; the machine idle
    .venv/bin/python benchmarks/bench_generate.py --quick    # smoke settings
    .venv/bin/python benchmarks/render_generate.py           # docs table and plot from the JSON
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import floor
import render_generate
import worker_process
from model_shapes import SHAPES

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SYSTEMS = ("kvlens", "kvlens-real", "tl", "hf-dynamic", "hf-static")
PEERS = ("tl", "hf-dynamic", "hf-static")
REAL_SHAPE = "smollm2-135m"  # the shape of the real weights kvlens-real loads

FULL = {
    "batches": [1, 8],
    "prompts": [128, 1024],
    "new_tokens": 128,
    "repeats": 3,
    "config_budget": 40.0,
    "config_timeout": 180.0,
    "contexts": [256, 512, 1024, 2048, 4096],
    "sweep_steps": 16,
    "sweep_systems": ["kvlens", "tl", "hf-dynamic", "hf-static"],
    "out": HERE / "results" / "generate.json",
}
QUICK = {
    "batches": [1, 2],
    "prompts": [16],
    "new_tokens": 8,
    "repeats": 2,
    "config_budget": 30.0,
    "config_timeout": 120.0,
    "contexts": [32, 64],
    "sweep_steps": 4,
    "sweep_systems": ["kvlens", "tl", "hf-dynamic", "hf-static"],
    # Smoke numbers are not results: kept out of the repository.
    "out": Path(tempfile.gettempdir()) / "kvlens-bench" / "generate_quick.json",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke settings (not benchmark data)")
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--parts", nargs="+", choices=["grid", "sweep"], default=["grid", "sweep"])
    p.add_argument(
        "--out",
        type=Path,
        help="JSON results (default benchmarks/results/generate.json; with --quick, "
        "$TMPDIR/kvlens-bench/generate_quick.json)",
    )
    p.add_argument("--batches", type=int, nargs="+", help="grid batch sizes (default 1 8)")
    p.add_argument("--prompts", type=int, nargs="+", help="grid prompt lengths (128 1024)")
    p.add_argument("--new-tokens", type=int, help="tokens generated per grid run (128)")
    p.add_argument("--repeats", type=int, help="grid runs per configuration, at most (3)")
    p.add_argument(
        "--config-budget", type=float, help="no new run past this many seconds of runs (40)"
    )
    p.add_argument(
        "--config-timeout", type=float, help="a configuration or sweep point is cut here (180 s)"
    )
    p.add_argument("--contexts", type=int, nargs="+", help="sweep context lengths (256 .. 4096)")
    p.add_argument("--sweep-steps", type=int, help="decode steps timed per sweep point (16)")
    p.add_argument("--sweep-systems", nargs="+", choices=SYSTEMS, help="systems in the sweep")
    p.add_argument("--threads", type=int, default=2, help="torch threads in every process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="list the workers and stop")
    p.add_argument(
        "--peer-python",
        type=Path,
        default=ROOT / ".peer-venv" / "bin" / "python",
        help="python of the peers' environment (benchmarks/peers/make-peer-venv.sh makes it)",
    )
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.new_tokens < 2 or args.sweep_steps < 1:
        p.error("--new-tokens must be >= 2 and --sweep-steps >= 1")
    if any(s in PEERS for s in args.systems) and not args.peer_python.exists():
        p.error(f"{args.peer_python} not found; run benchmarks/peers/make-peer-venv.sh first")
    return args


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One worker per (shape, system): its grid, smallest configuration first, and its sweep."""
    grid = sorted((b, p) for b in args.batches for p in args.prompts)
    specs = []
    for shape_name in args.shapes:
        for system in args.systems:
            if system == "kvlens-real" and shape_name != REAL_SHAPE:
                continue
            sweep = "sweep" in args.parts and system in args.sweep_systems
            spec = {
                "system": system,
                "shape_name": shape_name,
                "shape": SHAPES[shape_name],
                "threads": args.threads,
                "seed": args.seed,
                "grid": grid if "grid" in args.parts else [],
                "new_tokens": args.new_tokens,
                "repeats": args.repeats,
                "budget_s": args.config_budget,
                "config_timeout_s": args.config_timeout,
                "contexts": args.contexts if sweep else [],
                "sweep_batch": 1,
                "sweep_steps": args.sweep_steps,
            }
            if spec["grid"] or spec["contexts"]:
                specs.append(spec)
    return specs


def worker_command(spec: dict[str, Any], peer_python: Path) -> list[str]:
    if spec["system"] in PEERS:
        return [str(peer_python), str(HERE / "peers" / "generate_peer.py"), json.dumps(spec)]
    return [sys.executable, str(HERE / "generate_kvlens.py"), json.dumps(spec)]


def run_worker(
    spec: dict[str, Any], peer_python: Path, extra_env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run one worker: its records grouped by kind, its status, its wall time.

    ``extra_env`` is added to the worker's environment (e.g. ``PYTHONPATH`` naming another
    kvlens source tree, as ``bench_baseline.py`` does).
    """
    # Every configuration and sweep point is cut inside the worker; this only catches a hang.
    timeout = 300 + spec["config_timeout_s"] * (len(spec["grid"]) + len(spec["contexts"]))
    command = worker_command(spec, peer_python)
    run = worker_process.run_worker(command, spec["threads"], timeout, extra_env)
    if run["status"].startswith("error"):
        print(run["stderr"][-2000:], file=sys.stderr)
    records: dict[str, list[dict[str, Any]]] = {}
    for record in run["records"]:
        records.setdefault(record.pop("kind"), []).append(record)
    worker = {"status": run["status"], "wall_s": run["wall_s"], "records": records}
    if run["status"] != "ok":
        worker["stderr_tail"] = run["stderr"][-2000:]
    return worker


def _of_config(records: list[dict[str, Any]], batch: int, prompt: int) -> list[dict[str, Any]]:
    return [r for r in records if (r["batch"], r["prompt"]) == (batch, prompt)]


def grid_rows(spec: dict[str, Any], worker: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per grid configuration: medians over its runs, its memory, its status."""
    records = worker["records"]
    info = (records.get("info") or [{}])[0]
    rows = []
    for batch, prompt in spec["grid"]:
        mine = _of_config(records.get("run", []), batch, prompt)
        memory = _of_config(records.get("memory", []), batch, prompt)
        read = _of_config(records.get("read", []), batch, prompt)
        if memory:
            status = memory[0].pop("status")
        else:
            status = "not run: " + worker["status"] if worker["status"] != "ok" else "not run"
        row = {
            "system": spec["system"],
            "shape_name": spec["shape_name"],
            "batch": batch,
            "prompt": prompt,
            "new_tokens": spec["new_tokens"],
            "status": status,
            "runs": len(mine),
            "info": info,
            "memory": memory[0] if memory else {},
            "run_details": mine,
            "read_gb_s_beside": read[0]["gb_s"] if read else [],
            "loadavg_1m_after": os.getloadavg()[0],
        }
        if mine:
            total_s = statistics.median(r["total_s"] for r in mine)
            row.update(
                prefill_ms=statistics.median(r["prefill_ms"] for r in mine),
                decode_ms=statistics.median(r["decode_ms"] for r in mine),
                total_s=total_s,
                tokens_per_s=batch * spec["new_tokens"] / total_s,
            )
        rows.append(row)
    return rows


def sweep_row(spec: dict[str, Any], worker: dict[str, Any]) -> dict[str, Any]:
    points = worker["records"].get("point", [])
    return {
        "system": spec["system"],
        "shape_name": spec["shape_name"],
        "batch": spec["sweep_batch"],
        "sweep_steps": spec["sweep_steps"],
        "status": worker["status"],
        "points": [p for p in points if p["status"] == "ok"],
        "cut": [p for p in points if p["status"] != "ok"],
        "info": (worker["records"].get("info") or [{}])[0],
        "loadavg_1m_after": os.getloadavg()[0],
    }


def cpu_model() -> str:
    """The CPU's name, family and model, and whether it has AVX-512 (from /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name", "unknown")
    detail = f"family {fields.get('cpu family', '?')} model {fields.get('model', '?')}"
    if "avx512f" in fields.get("flags", "").split():
        detail += ", AVX-512"
    return f"{name} ({detail})"


def command_line() -> str:
    """The command as typed from the repository root (the interpreter's path kept if inside it)."""
    python = Path(sys.executable)
    with contextlib.suppress(ValueError):
        python = python.relative_to(Path.cwd())
    return " ".join([str(python), *sys.argv])


def git_revision() -> str:
    def git(*cmd: str) -> str:
        out = subprocess.run(["git", "-C", str(ROOT), *cmd], capture_output=True, text=True)
        return out.stdout.strip()

    try:
        rev = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except OSError:
        return "unknown"
    return (rev or "unknown") + ("+dirty" if dirty else "")


def machine_rates(threads: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    rates = floor.measure_machine()
    read, matmul = rates["read_gb_s"], rates["matmul_gflop_s"]
    print(f"floor rates: read {read:.1f} GB/s, matmul {matmul:.0f} GFLOP/s", file=sys.stderr)
    return rates


def warn_if_busy() -> None:
    load = os.getloadavg()[0]
    if load > 0.5:
        print(
            f"warning: load average {load:.2f}; the machine is not idle, so the numbers will be "
            "slow and noisy (threads oversubscribed)",
            file=sys.stderr,
        )


def describe(spec: dict[str, Any], rows: list[dict[str, Any]], sweep: dict[str, Any]) -> str:
    lines = [f"{spec['shape_name']} {spec['system']}:"]
    for r in rows:
        figures = r["status"]
        if r["runs"]:
            figures = (
                f"prefill {r['prefill_ms']:.0f} ms, decode {r['decode_ms']:.1f} ms/step, "
                f"{r['tokens_per_s']:.1f} tok/s ({r['runs']} runs, {r['status']})"
            )
        lines.append(f"  b{r['batch']} p{r['prompt']}: {figures}")
    if spec["contexts"]:
        points = ", ".join(f"{p['context']}: {p['decode_ms']:.1f}" for p in sweep["points"])
        cut = f"; cut at {sweep['cut'][0]['context']}" if sweep["cut"] else ""
        lines.append(f"  sweep ms/step at {points}{cut}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    specs = plan(args)
    if args.dry_run:
        for spec in specs:
            print(f"{spec['shape_name']} {spec['system']}: grid {spec['grid']}, "
                  f"sweep {spec['contexts']}")  # fmt: skip
        return
    warn_if_busy()
    started = time.perf_counter()
    meta: dict[str, Any] = {
        "benchmark": "generate",
        "quick": args.quick,
        "command": command_line(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": args.threads,
        "python": platform.python_version(),
        "kvlens_revision": git_revision(),
        "settings": {
            k: getattr(args, k) for k in (*FULL, "systems", "shapes", "parts", "seed") if k != "out"
        },
        "loadavg_before": os.getloadavg(),
        "machine_before": machine_rates(args.threads),
    }
    results: dict[str, Any] = {"meta": meta, "grid": [], "sweep": []}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")

    for i, spec in enumerate(specs, 1):
        worker = run_worker(spec, args.peer_python)
        rows = grid_rows(spec, worker)
        sweep = sweep_row(spec, worker)
        results["grid"] += rows
        if spec["contexts"]:
            results["sweep"].append(sweep)
        elapsed = time.perf_counter() - started
        print(f"[{i}/{len(specs)}, {elapsed:.0f} s] {describe(spec, rows, sweep)}", file=sys.stderr)
        save()
    meta["machine_after"] = machine_rates(args.threads)
    meta["loadavg_after"] = os.getloadavg()
    meta["wall_s"] = time.perf_counter() - started
    render_generate.add_floors(results)
    save()
    print(render_generate.markdown_tables(results))


if __name__ == "__main__":
    main()
