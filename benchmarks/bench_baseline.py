"""Benchmark: one generation-benchmark row for two kvlens source trees, side by side in one run.

A change to the library's hot path is judged by the generation benchmark's row before and after
it, measured in the same run (this machine's memory speed drifts over minutes, so rows taken in
different runs are not comparable). This script extracts ``src/kvlens`` of a git revision (the
baseline) into a temporary folder and runs ``generate_kvlens.py`` workers, alternating between
the baseline and the working tree, round after round: each round is a fresh process per tree
that runs the row's configuration once. Reported: each tree's median decode ms/step and prefill
ms over the rounds, and their ratio.

Usage (on an otherwise idle machine)::

    .venv/bin/python benchmarks/bench_baseline.py --baseline 1882f84 --rounds 5

``--candidate REV`` measures that revision in place of the working tree (so that uncommitted
edits made meanwhile cannot reach the run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path
from typing import Any

from bench_generate import ROOT, cpu_model, git_revision, run_worker
from model_shapes import SHAPES

RESULTS = Path(__file__).resolve().parent / "results"


def extract_source(revision: str, into: Path) -> Path:
    """Write ``src/kvlens`` of ``revision`` under ``into``; return the folder to put on the path."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", revision, "src/kvlens"],
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def spec_for(args: argparse.Namespace) -> dict[str, Any]:
    """One worker's spec: the row's configuration, run once."""
    return {
        "system": args.system,
        "shape_name": args.shape,
        "shape": SHAPES[args.shape],
        "threads": args.threads,
        "seed": 0,
        "grid": [[args.batch, args.prompt]],
        "new_tokens": args.new_tokens,
        "repeats": 1,
        "budget_s": 1e9,
        "config_timeout_s": 300.0,
        "contexts": [],
        "sweep_batch": 1,
        "sweep_steps": 1,
    }


def one_run(spec: dict[str, Any], src: Path | None) -> dict[str, Any]:
    env = {"PYTHONPATH": str(src)} if src is not None else {}
    worker = run_worker(spec, Path(sys.executable), env)
    runs = worker["records"].get("run", [])
    if worker["status"] != "ok" or not runs:
        raise RuntimeError(f"worker failed ({worker['status']}): {worker.get('stderr_tail', '')}")
    info = (worker["records"].get("info") or [{}])[0]
    return {**runs[0], "kvlens_file": info.get("kvlens_file"), "read": worker["records"]["read"]}


def summary(result: dict[str, Any]) -> str:
    """One line: each tree's median decode ms/step, and the ratio raw and rate-adjusted.

    The rate-adjusted ratio compares ``decode_ms * read rate`` (the bytes a step is worth at the
    memory speed measured beside its run), which takes out the machine's memory-speed drift.
    """

    def adjusted(run: dict[str, Any]) -> float:
        rates = run["read"][0]["gb_s"]
        return float(run["decode_ms"] * sum(rates) / len(rates))

    runs, median = result["runs"], result["median"]
    rate_ratio = statistics.median(map(adjusted, runs["tree"])) / statistics.median(
        map(adjusted, runs["baseline"])
    )
    cfg = result["config"]
    return (
        f"{cfg['system']} {cfg['shape']} b{cfg['batch']} p{cfg['prompt']}: baseline "
        f"{result['baseline']} {median['baseline']['decode_ms']:.2f} ms/step, tree "
        f"{result['tree']} {median['tree']['decode_ms']:.2f} ms/step; tree / baseline "
        f"{result['tree_over_baseline_decode']:.3f} (adjusted for the read rate beside each run: "
        f"{rate_ratio:.3f}); {len(runs['tree'])} rounds, medians; {result['cpu']}; "
        f"{result['started']}"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", help="git revision to compare the tree against")
    p.add_argument("--candidate", help="git revision measured instead of the working tree")
    p.add_argument("--report", type=Path, help="print the summary of a results file and stop")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (5)")
    p.add_argument("--system", choices=("kvlens", "kvlens-real"), default="kvlens-real")
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS / "baseline.json")
    args = p.parse_args(argv)
    if args.report is not None:
        print(summary(json.loads(args.report.read_text())))
        return
    if args.baseline is None:
        p.error("--baseline is required (or --report FILE)")
    spec = spec_for(args)
    runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "tree": []}
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with tempfile.TemporaryDirectory() as tmp:
        src = extract_source(args.baseline, Path(tmp) / "baseline")
        tree = None
        if args.candidate is not None:
            tree = extract_source(args.candidate, Path(tmp) / "candidate")
        for index in range(args.rounds):
            for name, path in (
                (("baseline", src), ("tree", tree))
                if index % 2 == 0
                else (
                    ("tree", tree),
                    ("baseline", src),
                )
            ):
                run = one_run(spec, path)
                runs[name].append(run)
                print(
                    f"round {index + 1} {name}: decode {run['decode_ms']:.2f} ms/step, "
                    f"prefill {run['prefill_ms']:.1f} ms",
                    file=sys.stderr,
                )
    median = {
        name: {
            "decode_ms": statistics.median(r["decode_ms"] for r in rs),
            "prefill_ms": statistics.median(r["prefill_ms"] for r in rs),
        }
        for name, rs in runs.items()
    }
    result = {
        "started": started,
        "cpu": cpu_model(),
        "tree": args.candidate or git_revision(),
        "baseline": args.baseline,
        "config": {k: v for k, v in vars(args).items() if k != "out"} | {"out": str(args.out)},
        "median": median,
        "tree_over_baseline_decode": median["tree"]["decode_ms"] / median["baseline"]["decode_ms"],
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(summary(result))


if __name__ == "__main__":
    main()
