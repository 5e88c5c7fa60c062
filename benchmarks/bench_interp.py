"""Benchmark: generation while hooking, in kvlens, nnsight 0.8.1, TransformerLens 2.18 and 4.3.

The workload of issue 16 (item 7): the SmolLM2-135M shape (``model_shapes.py``) with random
weights, saved once as a local Hugging Face folder (safetensors, config, tokenizer) that every
system loads, so all run the same weights; fp32, 2 threads in every process; a random 128-token
prompt at batch 1 and 8; 64 new tokens, greedy, no EOS stop, no progress bars. Scenarios:

1. ``plain``: generate, no hook;
2. ``steer``: a fixed random vector added to layer 15's residual stream output
   (``blocks.15.hook_resid_post``; nnsight: the output of ``model.model.layers[15]``) at every
   position of every pass;
3. ``record``: every layer's residual stream output (30 layers) kept for every position of every
   pass (prompt and generated), in lists the user has after the call;
4. ``cache``: ``generate(..., return_cache=True, names_filter=<the 30 hook_resid_post>)``, kvlens
   (where its ``generate`` has the argument) and TransformerLens 4.3 only; ``cache_all`` (4b):
   the same with ``names_filter=None``, every hook point.

Each system runs in its own virtual environment: kvlens in ``.venv`` (``interp_kvlens.py``), the
peers through ``peers/interp_peer.py`` in ``.nnsight-venv``, ``.peer-venv`` (TransformerLens
2.18) and ``.tl4-venv``, made by the ``make-*-venv.sh`` scripts in ``peers/``. A worker is a
fresh process for one system, scenario and batch size; the systems take turns within each
scenario and batch (their order rotating), so a row's figures are minutes apart at most, as this
machine's memory bandwidth drifts. ``interp_harness.py`` says what one measurement is: ms per
generated token = the whole generate call (prefill included) / 64, median of ``--repeats`` calls
after a warm-up call (more, up to ``--max-repeats``, while the calls disagree by over
``--spread``: other processes on a shared machine stall single calls), and the checks made on
the output (recorded activations against an uncached forward pass; steered tokens against plain
ones; plain tokens against kvlens's).

Writes ``benchmarks/results/interp.json`` (rewritten after every worker) and prints a markdown
table: ms per token per system, kvlens's speed-up over each peer, and the issue's goals (steering
>= 1.5x nnsight and >= 2x both TransformerLens versions; recording and return_cache the same).

Usage::

    bash benchmarks/peers/make-peer-venv.sh && bash benchmarks/peers/make-nnsight-venv.sh \\
        && bash benchmarks/peers/make-tl4-venv.sh
    .venv/bin/python benchmarks/bench_interp.py            # the full run; the machine idle
    .venv/bin/python benchmarks/bench_interp.py --quick    # smoke settings (not results)
    .venv/bin/python benchmarks/bench_interp.py --systems kvlens tl4 --scenarios steer
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import worker_process
from bench_generate import command_line, cpu_model, git_revision, warn_if_busy
from interp_harness import SCENARIOS
from model_shapes import SHAPES

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHAPE_NAME = "smollm2-135m"
SYSTEMS = ("kvlens", "nnsight", "tl2", "tl4")
TITLES = {
    "kvlens": "kvlens",
    "nnsight": "nnsight 0.8.1",
    "tl2": "TL 2.18",
    "tl4": "TL 4.3 (bridge)",
}
ENVS = {"nnsight": ".nnsight-venv", "tl2": ".peer-venv", "tl4": ".tl4-venv"}
MAKERS = {"nnsight": "make-nnsight-venv.sh", "tl2": "make-peer-venv.sh", "tl4": "make-tl4-venv.sh"}
# Which systems have a scenario: return_cache is a generate argument of kvlens and TL 4.3 only.
HAS = {
    "plain": SYSTEMS,
    "steer": SYSTEMS,
    "record": SYSTEMS,
    "cache": ("kvlens", "tl4"),
    "cache_all": ("kvlens", "tl4"),
}
# The goals: kvlens's speed-up at least this over each peer. In the cache rows a peer
# without return_cache is compared by its recording (the same activations kept by hooks).
GOALS = {
    "steer": {"nnsight": 1.5, "tl2": 2.0, "tl4": 2.0},
    "record": {"nnsight": 1.5, "tl2": 2.0, "tl4": 2.0},
    "cache": {"nnsight": 1.5, "tl2": 2.0, "tl4": 2.0},
}
PEER_FALLBACK = {"cache": "record"}

FULL = {
    "batches": [1, 8],
    "prompt": 128,
    "new_tokens": 64,
    "repeats": 3,
    "max_repeats": 6,
    "timeout": 600.0,
    "out": HERE / "results" / "interp.json",
}
QUICK = {
    "batches": [1, 2],
    "prompt": 16,
    "new_tokens": 4,
    "repeats": 1,
    "max_repeats": 1,
    "timeout": 300.0,
    # Smoke numbers are not results: kept out of the repository.
    "out": Path(tempfile.gettempdir()) / "kvlens-bench" / "interp_quick.json",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke settings (not benchmark data)")
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    p.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    p.add_argument("--batches", type=int, nargs="+", help="batch sizes (default 1 8)")
    p.add_argument("--prompt", type=int, help="prompt tokens (128)")
    p.add_argument("--new-tokens", type=int, help="tokens generated per call (64)")
    p.add_argument("--repeats", type=int, help="timed calls after the warm-up (3)")
    p.add_argument(
        "--max-repeats",
        type=int,
        help="more timed calls, up to this many, while their times differ by over --spread (6)",
    )
    p.add_argument(
        "--spread", type=float, default=1.25, help="slowest / fastest call that asks for more"
    )
    p.add_argument("--timeout", type=float, help="a worker's calls are cut here (600 s)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in every process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--steer-scale", type=float, default=4.0, help="the steering vector is this x randn"
    )
    p.add_argument(
        "--folder",
        type=Path,
        default=Path(tempfile.gettempdir()) / "kvlens-bench" / "interp-smollm2-135m",
        help="the weights folder every system loads (made once, then reused)",
    )
    p.add_argument("--out", type=Path, help="JSON results (default benchmarks/results/interp.json)")
    p.add_argument("--dry-run", action="store_true", help="list the workers and stop")
    p.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="measure nothing: summarize this results file (a finished or cut run) and print "
        "its table",
    )
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    missing = [s for s in args.systems if s != "kvlens" and not python_of(s).exists()]
    if missing and not (args.dry_run or args.render):
        makers = ", ".join(f"benchmarks/peers/{MAKERS[s]}" for s in missing)
        p.error(f"no environment for {missing}; run {makers} first")
    return args


def python_of(system: str) -> Path:
    if system == "kvlens":
        return Path(sys.executable)
    return ROOT / ENVS[system] / "bin" / "python"


def make_folder(folder: Path, seed: int) -> dict[str, Any]:
    """Save random SmolLM2-shaped weights as a Hugging Face folder, once; describe it.

    Llama architecture, embeddings untied (as the generation benchmark's peers store them),
    transformers' own initialisation under ``seed``; no EOS in the generation config, so every
    call generates exactly the tokens asked for. The tokenizer is SmolLM2's, from the GGUF file
    of the default model's package (the loaders want one; the prompts are token ids).
    """
    stamp = folder / "bench-interp.json"
    if stamp.is_file():
        return json.loads(stamp.read_text())
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvlens.loading.gguf import default_gguf_path, open_gguf, read_fields
    from kvlens.loading.tokenizer import tokenizer_from_gguf

    shape = SHAPES[SHAPE_NAME]
    config = LlamaConfig(
        vocab_size=shape["d_vocab"],
        hidden_size=shape["d_model"],
        intermediate_size=shape["d_mlp"],
        num_hidden_layers=shape["n_layers"],
        num_attention_heads=shape["n_heads"],
        num_key_value_heads=shape["n_key_value_heads"],
        head_dim=shape["d_head"],
        max_position_embeddings=shape["n_ctx"],
        rope_theta=shape["rotary_base"],
        rms_norm_eps=shape["eps"],
        hidden_act="silu",
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    model.generation_config.pad_token_id = None
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    gguf = default_gguf_path()
    tokenizer_from_gguf(read_fields(open_gguf(gguf), gguf)).save_pretrained(folder)
    about = {"shape": SHAPE_NAME, "seed": seed, "tokenizer_from": gguf.name, "folder": str(folder)}
    stamp.write_text(json.dumps(about) + "\n")
    return about


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One worker per (scenario, batch, system); the systems' order rotates from row to row."""
    specs = []
    turn = 0
    for scenario in args.scenarios:
        for batch in args.batches:
            systems = [s for s in args.systems if s in HAS[scenario]]
            systems = systems[turn % len(systems) :] + systems[: turn % len(systems)]
            turn += 1
            for system in systems:
                specs.append(
                    {
                        "system": system,
                        "scenario": scenario,
                        "batch": batch,
                        "prompt": args.prompt,
                        "new_tokens": args.new_tokens,
                        "repeats": args.repeats,
                        "max_repeats": max(args.repeats, args.max_repeats),
                        "spread": args.spread,
                        "timeout_s": args.timeout,
                        "threads": args.threads,
                        "seed": args.seed,
                        "steer_scale": args.steer_scale,
                        "folder": str(args.folder),
                        "shape": SHAPES[SHAPE_NAME],
                    }
                )
    return specs


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one worker; its ``info`` and ``result`` records, its status and wall time."""
    system = spec["system"]
    script = HERE / ("interp_kvlens.py" if system == "kvlens" else "peers/interp_peer.py")
    quiet = dict(TQDM_DISABLE="1", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    command = [str(python_of(system)), str(script), json.dumps(spec)]
    run = worker_process.run_worker(command, spec["threads"], spec["timeout_s"] + 300, quiet)
    status = run["status"]
    if status.startswith("killed"):
        status = "killed after the worker's time limit"
    records = {record.pop("kind"): record for record in run["records"]}
    row = {
        "system": system,
        "scenario": spec["scenario"],
        "batch": spec["batch"],
        "worker_status": status,
        "wall_s": run["wall_s"],
        "info": records.get("info", {}),
        **records.get("result", {"status": "no result: " + status}),
        "loadavg_1m_after": os.getloadavg()[0],
    }
    if status != "ok" or "result" not in records:
        row["stderr_tail"] = run["stderr"][-3000:]
    return row


def row_of(rows: list[dict[str, Any]], system: str, scenario: str, batch: int) -> dict | None:
    for r in rows:
        if (r["system"], r["scenario"], r["batch"]) == (system, scenario, batch):
            return r
    return None


def agreement(a: dict | None, b: dict | None) -> float | None:
    """Fraction of generated tokens two rows share (None if either has none)."""
    if not a or not b or "new_tokens" not in a or "new_tokens" not in b:
        return None
    x, y = torch.tensor(a["new_tokens"]), torch.tensor(b["new_tokens"])
    return float((x == y).float().mean()) if x.shape == y.shape else None


def cross_checks(rows: list[dict[str, Any]]) -> None:
    """Per row: tokens shared with the same system's plain run and with kvlens's same scenario."""
    for r in rows:
        plain = row_of(rows, r["system"], "plain", r["batch"])
        kv = row_of(rows, "kvlens", r["scenario"], r["batch"])
        checks = r.setdefault("check", {})
        if r["scenario"] != "plain":
            checks["tokens_equal_to_plain"] = agreement(r, plain)
        if r["system"] != "kvlens":
            checks["tokens_equal_to_kvlens"] = agreement(r, kv)
        if r["scenario"] == "steer" and checks.get("tokens_equal_to_plain") is not None:
            checks["steering_changed_tokens"] = checks["tokens_equal_to_plain"] < 1.0


def speedups(rows: list[dict[str, Any]], scenario: str, batch: int) -> dict[str, Any]:
    """kvlens's speed-up over each peer in one row, and whether the issue's goal is met."""
    kv = row_of(rows, "kvlens", scenario, batch)
    out: dict[str, Any] = {}
    for peer in SYSTEMS[1:]:
        other = row_of(rows, peer, scenario, batch)
        compared = scenario
        if (other is None or "ms_per_token" not in other) and scenario in PEER_FALLBACK:
            compared = PEER_FALLBACK[scenario]
            other = row_of(rows, peer, compared, batch)
        if not kv or not other or "ms_per_token" not in kv or "ms_per_token" not in other:
            continue
        ratio = other["ms_per_token"] / kv["ms_per_token"]
        goal = GOALS.get(scenario, {}).get(peer)
        out[peer] = {
            "ratio": ratio,
            # The fastest calls' ratio: on a busy machine, the one least disturbed by others.
            "ratio_of_minimums": other["ms_per_token_min"] / kv["ms_per_token_min"],
            "peer_scenario": compared,
            "goal": goal,
            "met": None if goal is None else ratio >= goal,
        }
    return out


def markdown(results: dict[str, Any]) -> str:
    rows, meta = results["rows"], results["meta"]
    systems = [s for s in SYSTEMS if any(r["system"] == s for r in rows)]
    head = ["scenario", "batch", *(TITLES[s] + " ms/tok" for s in systems)]
    head += [f"kvlens vs {TITLES[s]}" for s in systems if s != "kvlens"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for scenario in meta["settings"]["scenarios"]:
        for batch in meta["settings"]["batches"]:
            cells = [scenario, str(batch)]
            for s in systems:
                r = row_of(rows, s, scenario, batch)
                if r is None:
                    cells.append("-")
                elif "ms_per_token" in r:
                    ok = r.get("check", {}).get("ok", True)
                    figure = f"{r['ms_per_token']:.1f} [{r['ms_per_token_min']:.1f}]"
                    cells.append(figure + ("" if ok else " (check failed)"))
                else:
                    cells.append(r.get("status", "?")[:60])
            ratios = results["speedups"].get(f"{scenario}/b{batch}", {})
            for s in systems:
                if s == "kvlens":
                    continue
                x = ratios.get(s)
                if x is None:
                    cells.append("-")
                    continue
                text = f"{x['ratio']:.2f}x [{x['ratio_of_minimums']:.2f}x]"
                if x["peer_scenario"] != scenario:
                    text += f" (its {x['peer_scenario']})"
                if x["goal"] is not None:
                    text += f" {'meets' if x['met'] else 'misses'} >= {x['goal']}x"
                cells.append(text)
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "ms/tok: median of the timed calls, [their minimum]; kvlens vs X: X's time / kvlens's "
        "(medians) [minimums]; 'its record': the peer has no return_cache, its recording is "
        "compared. (check failed): its activations or tokens did not pass the output check."
    )
    return "\n".join(lines)


def summarize(results: dict[str, Any]) -> None:
    """Cross-system checks and speed-ups, from the rows measured so far."""
    settings = results["meta"]["settings"]
    cross_checks(results["rows"])
    results["speedups"] = {
        f"{scenario}/b{batch}": speedups(results["rows"], scenario, batch)
        for scenario in settings["scenarios"]
        for batch in settings["batches"]
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.render:
        results = json.loads(args.render.read_text())
        summarize(results)
        print(markdown(results))
        return
    specs = plan(args)
    if args.dry_run:
        for spec in specs:
            where = python_of(spec["system"])
            print(f"{spec['scenario']} b{spec['batch']}: {spec['system']} ({where})")
        return
    warn_if_busy()
    started = time.perf_counter()
    folder = make_folder(args.folder, args.seed)
    meta: dict[str, Any] = {
        "benchmark": "interp",
        "quick": args.quick,
        "command": command_line(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": args.threads,
        "python": platform.python_version(),
        "kvlens_revision": git_revision(),
        "weights": folder,
        "settings": {
            "shape": SHAPE_NAME,
            "systems": args.systems,
            "scenarios": args.scenarios,
            "batches": args.batches,
            "prompt": args.prompt,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "max_repeats": args.max_repeats,
            "spread": args.spread,
            "seed": args.seed,
            "steer_scale": args.steer_scale,
            "timeout_s": args.timeout,
        },
        "loadavg_before": os.getloadavg(),
    }
    results: dict[str, Any] = {"meta": meta, "rows": [], "speedups": {}}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")

    for i, spec in enumerate(specs, 1):
        row = run_worker(spec)
        results["rows"].append(row)
        figure = f"{row['ms_per_token']:.1f} ms/token" if "ms_per_token" in row else row["status"]
        ok = row.get("check", {}).get("ok")
        elapsed = time.perf_counter() - started
        print(
            f"[{i}/{len(specs)}, {elapsed:.0f} s] {spec['scenario']} b{spec['batch']} "
            f"{spec['system']}: {figure} (check ok: {ok})",
            file=sys.stderr,
        )
        if "stderr_tail" in row:
            print(row["stderr_tail"][-1500:], file=sys.stderr)
        save()
    summarize(results)
    meta["loadavg_after"] = os.getloadavg()
    meta["wall_s"] = time.perf_counter() - started
    meta["median_read_gb_s"] = (
        statistics.median(x for r in results["rows"] for x in r.get("read_gb_s_beside", []))
        if any(r.get("read_gb_s_beside") for r in results["rows"])
        else None
    )
    save()
    print(markdown(results))


if __name__ == "__main__":
    main()
