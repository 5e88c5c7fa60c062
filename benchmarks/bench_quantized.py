"""Benchmark: kvlens on the default model's own GGUF file beside llama.cpp on the same file.

Systems, batch 1, the same thread count, the same random prompt, each in a fresh subprocess per
round (the rounds alternate the systems, and rotate their order, so a drift of the shared
machine falls on all of them):

- ``kvlens-fp32``: ``HookedTransformer.from_pretrained(None)``, fp32 (``quantized_kvlens.py``);
- ``kvlens-q``: ``HookedTransformer.from_pretrained(None, quantized=True)``;
- ``kvlens-q-steer``: ``kvlens-q`` with a fixed random vector added at
  ``blocks.15.hook_resid_post`` during ``generate`` (``model.hooks``, as ``bench_interp.py``);
- ``llama.cpp``: llama-cpp-python 0.3.36 (``peers/llamacpp_peer.py``, in ``.llamacpp-venv``,
  ``peers/make-llamacpp-venv.sh``), its low-level ``eval`` loop, greedy.

A system the installed kvlens cannot build (no ``quantized`` argument yet) is reported
``unavailable`` with its error. The prompt: ``--prompt-len`` token ids drawn with ``--seed`` from
the file's normal tokens (no control tokens). Each worker warms up, then times ``--repeats`` runs
of ``--new-tokens`` greedy tokens: prefill ms (the prompt to the first new token) and decode
ms/step (the ``n - 1`` steps after it, median and mean); a system's figure is the median over
rounds of its workers' medians. Resident memory: ``VmRSS`` after the load (kvlens after ``gc`` and
``malloc_trim``; llama.cpp loads with ``use_mmap=False`` so its weights are resident).

The floor of a decode step is the bytes of weights it reads over the machine's read rate
(``floor.measure_read_bandwidth``, at the start and the end; the floor uses their mean). Weights
are counted from the GGUF's tensors (``GGUFReader``, ``n_bytes``): every block tensor (quantized
matrices and fp32 norms), the final norm, and the output matrix, which is ``token_embd`` (the
embedding is tied, so it is counted once, whole, as the unembedding; the one embedding row a
step reads besides is left out). The quantized floor counts the file's bytes; the fp32 floor
(``kvlens-fp32``) the same tensors' elements at 4 bytes. The KV cache a step reads is not in the
floor (it is recorded: under 8 MB in fp32 at these lengths).

Writes ``benchmarks/results/quantized.json`` (rewritten after every worker) and prints a Markdown
table (``--from-json`` prints it again from a stored result). The machine is shared: the table
gives the median over rounds and, in brackets, the best round, the least disturbed.

Usage::

    benchmarks/peers/make-llamacpp-venv.sh                  # once; compiles llama.cpp
    .venv/bin/python benchmarks/bench_quantized.py          # 5 rounds, 64 new tokens, 2 threads
    .venv/bin/python benchmarks/bench_quantized.py --quick  # one round, short runs
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import statistics
import sys
from pathlib import Path
from typing import Any

import gguf
import torch

import floor
import worker_process
from bench_generate import cpu_model
from kvlens.loading.gguf import default_gguf_path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SYSTEMS = ("kvlens-fp32", "kvlens-q", "kvlens-q-steer", "llama.cpp")
PEER = "llama.cpp"
QUANTIZED_FLOOR = ("kvlens-q", "kvlens-q-steer", PEER)
NORMAL_TOKEN = 1  # tokenizer.ggml.token_type of an ordinary token (3 is a control token)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="fresh workers per system")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per worker")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steer-scale", type=float, default=4.0, help="the vector is this x randn")
    p.add_argument("--steer-layer", type=int, default=15)
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    p.add_argument("--timeout", type=float, default=900, help="seconds per worker")
    p.add_argument("--out", type=Path, default=HERE / "results" / "quantized.json")
    p.add_argument(
        "--llamacpp-python", type=Path, default=ROOT / ".llamacpp-venv" / "bin" / "python"
    )
    p.add_argument("--quick", action="store_true", help="1 round, 16 tokens, 1 repeat")
    p.add_argument(
        "--from-json", type=Path, help="summarize and print a stored result; run nothing"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.new_tokens, args.repeats = 1, 16, 1
    return args


def token_types(reader: gguf.GGUFReader) -> list[int]:
    """``tokenizer.ggml.token_type`` of every token id."""
    field = reader.fields["tokenizer.ggml.token_type"]
    return [int(field.parts[i][0]) for i in field.data]


def draw_prompt(reader: gguf.GGUFReader, length: int, seed: int) -> list[int]:
    """``length`` token ids drawn with ``seed`` from the file's normal tokens."""
    normal = [i for i, kind in enumerate(token_types(reader)) if kind == NORMAL_TOKEN]
    rng = random.Random(seed)
    return [rng.choice(normal) for _ in range(length)]


def weight_bytes(reader: gguf.GGUFReader) -> dict[str, int]:
    """Bytes of the weights a decode step reads, from the file's tensors (see the docstring)."""
    tensors = {t.name: t for t in reader.tensors}
    unembed = tensors.get("output.weight", tensors["token_embd.weight"])
    blocks = [t for t in reader.tensors if t.name.startswith("blk.")]
    vectors = [t for t in blocks if t.tensor_type == gguf.GGMLQuantizationType.F32]
    vectors += [t for t in reader.tensors if t.name == "output_norm.weight"]
    matrices = [t for t in blocks if t.tensor_type != gguf.GGMLQuantizationType.F32]
    read = [*matrices, *vectors, unembed]
    return {
        "block_matrices": sum(int(t.n_bytes) for t in matrices),
        "norms_fp32": sum(int(t.n_bytes) for t in vectors),
        "unembed": int(unembed.n_bytes),
        "unembed_type": unembed.tensor_type.name,
        "quantized_step": sum(int(t.n_bytes) for t in read),
        "fp32_step": 4 * sum(int(t.n_elements) for t in read),
    }


def kv_cache_bytes(reader: gguf.GGUFReader, context: int) -> int:
    """fp32 bytes of the keys and values cached for ``context`` positions."""

    def scalar(key: str) -> int:
        field = reader.fields[key]
        return int(field.parts[field.data[0]][0])

    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    n_layers, d_model = scalar(f"{arch}.block_count"), scalar(f"{arch}.embedding_length")
    n_heads, n_kv = (
        scalar(f"{arch}.attention.head_count"),
        scalar(f"{arch}.attention.head_count_kv"),
    )
    return 4 * context * n_layers * 2 * n_kv * (d_model // n_heads)


def worker_command(spec: dict[str, Any], peer_python: Path) -> list[str]:
    if spec["system"] == PEER:
        return [str(peer_python), str(HERE / "peers" / "llamacpp_peer.py"), json.dumps(spec)]
    return [sys.executable, str(HERE / "quantized_kvlens.py"), json.dumps(spec)]


def run_worker(spec: dict[str, Any], peer_python: Path, timeout: float) -> dict[str, Any]:
    """Run one worker: its records grouped by kind, its status, its wall time."""
    run = worker_process.run_worker(worker_command(spec, peer_python), spec["threads"], timeout)
    records: dict[str, list[dict[str, Any]]] = {}
    for record in run["records"]:
        records.setdefault(record.pop("kind"), []).append(record)
    status = "unavailable" if "unavailable" in records else run["status"]
    worker = {"status": status, "wall_s": run["wall_s"], "records": records}
    if status != "ok":
        worker["stderr_tail"] = run["stderr"][-2000:]
    return worker


def round_order(systems: list[str], index: int) -> list[str]:
    """The systems rotated by the round's index."""
    shift = index % len(systems)
    return systems[shift:] + systems[:shift]


def run_rounds(args: argparse.Namespace, base: dict[str, Any], result: dict[str, Any]) -> None:
    """Every round's workers, the JSON rewritten after each; a system that is unavailable or
    fails is not run again."""
    dropped: set[str] = set()
    for index in range(args.rounds):
        for system in round_order(list(args.systems), index):
            if system in dropped:
                continue
            print(f"round {index + 1}/{args.rounds}: {system}", file=sys.stderr, flush=True)
            worker = run_worker({**base, "system": system}, args.llamacpp_python, args.timeout)
            result["workers"].setdefault(system, []).append(worker)
            if worker["status"] != "ok":
                dropped.add(system)
                print(f"  {worker['status']}: {unavailable_reason(worker)}", file=sys.stderr)
            write(args.out, result)


def unavailable_reason(worker: dict[str, Any]) -> str:
    """The worker's own error, else the last line of its stderr."""
    records = worker["records"].get("unavailable")
    if records:
        return records[0]["error"]
    lines = worker.get("stderr_tail", "").strip().splitlines()
    return lines[-1] if lines else worker["status"]


def summarize(workers: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the system's successful workers (one per round)."""
    ok = [w for w in workers if w["status"] == "ok" and "summary" in w["records"]]
    if not ok:
        return {"status": workers[0]["status"], "error": unavailable_reason(workers[0])}

    def median(kind: str, key: str) -> float:
        return statistics.median(w["records"][kind][0][key] for w in ok)

    def best(key: str) -> float:
        return min(w["records"]["summary"][0][key] for w in ok)

    return {
        "status": "ok",
        "rounds": len(ok),
        "prefill_ms": median("summary", "prefill_ms"),
        "decode_median_ms": median("summary", "decode_median_ms"),
        "decode_mean_ms": median("summary", "decode_ms"),
        "decode_median_ms_per_round": [w["records"]["summary"][0]["decode_median_ms"] for w in ok],
        "prefill_ms_best_round": best("prefill_ms"),
        "decode_median_ms_best_round": best("decode_median_ms"),
        "rss_after_load_mb": median("info", "rss_after_build_mb"),
        "rss_after_warmup_mb": median("memory", "rss_after_warmup_mb"),
        "load_s": median("info", "build_s"),
        "tokens": ok[0]["records"]["run"][-1]["tokens"],
        "info": ok[0]["records"]["info"][0],
    }


def agreement(tokens: list[int], reference: list[int]) -> int:
    """How many leading greedy tokens two systems share."""
    same = 0
    for a, b in zip(tokens, reference, strict=False):
        if a != b:
            break
        same += 1
    return same


def add_comparisons(result: dict[str, Any]) -> None:
    """Each system's floor, its ratio to the floor and to llama.cpp, and its token agreement."""
    rates = result["machine"]["read_gb_s"]
    rate = statistics.fmean(r for r in rates if r is not None) * 1e9
    peer = result["systems"].get(PEER, {})
    for name, row in result["systems"].items():
        if row["status"] != "ok":
            continue
        key = "quantized_step" if name in QUANTIZED_FLOOR else "fp32_step"
        row["floor_ms"] = 1e3 * result["weights_bytes"][key] / rate
        row["decode_over_floor"] = row["decode_median_ms"] / row["floor_ms"]
        if peer.get("status") == "ok":
            row["decode_over_llamacpp"] = row["decode_median_ms"] / peer["decode_median_ms"]
            row["prefill_over_llamacpp"] = row["prefill_ms"] / peer["prefill_ms"]
            row["decode_best_over_llamacpp_best"] = (
                row["decode_median_ms_best_round"] / peer["decode_median_ms_best_round"]
            )
            row["tokens_agreeing_with_llamacpp"] = agreement(row["tokens"], peer["tokens"])
    steered, plain = result["systems"].get("kvlens-q-steer"), result["systems"].get("kvlens-q")
    if steered and plain and steered["status"] == plain["status"] == "ok":
        # The steering must change the generation: few leading tokens in common.
        steered["tokens_agreeing_with_unsteered"] = agreement(steered["tokens"], plain["tokens"])


def fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def with_best(row: dict[str, Any], key: str, spec: str) -> str:
    """The median over rounds, and in brackets the best round's figure."""
    return f"{fmt(row[key], spec)} ({fmt(row[key + '_best_round'], spec)})"


def table(result: dict[str, Any]) -> str:
    """The Markdown table of the systems."""
    lines = [
        f"| system | prefill ms ({result['config']['prompt_len']} tokens) (best round) "
        "| decode ms/step median (best round) "
        "| floor ms | ÷ floor | RSS MB after load | decode ÷ llama.cpp | prefill ÷ llama.cpp |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in result["systems"].items():
        if row["status"] != "ok":
            error = row["error"].replace("|", "/")[:100]
            lines.append(f"| {name} | {row['status']}: {error} | | | | | | |")
            continue
        cells = [
            with_best(row, "prefill_ms", ".1f"),
            with_best(row, "decode_median_ms", ".2f"),
            fmt(row.get("floor_ms"), ".2f"),
            fmt(row.get("decode_over_floor"), ".2f"),
            fmt(row["rss_after_load_mb"], ".0f"),
            fmt(row.get("decode_over_llamacpp"), ".2f"),
            fmt(row.get("prefill_over_llamacpp"), ".2f"),
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def floor_note(result: dict[str, Any]) -> str:
    """What the floors count, in one line."""
    w = result["weights_bytes"]
    return (
        f"Floor: weight bytes per step over the mean read rate. Quantized (kvlens-q, llama.cpp): "
        f"{w['quantized_step'] / 1e6:.1f} MB = block matrices {w['block_matrices'] / 1e6:.1f} "
        f"+ fp32 norms {w['norms_fp32'] / 1e6:.2f} + output matrix (token_embd, tied, "
        f"{w['unembed_type']}) {w['unembed'] / 1e6:.1f}; fp32 (kvlens-fp32): "
        f"{w['fp32_step'] / 1e6:.1f} MB. KV cache not counted."
    )


def write(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)


def read_rate_gb_s() -> float:
    return floor.measure_read_bandwidth() / 1e9


def report(result: dict[str, Any]) -> None:
    """Summarize the workers into ``systems`` and print the table."""
    result["systems"] = {s: summarize(ws) for s, ws in result["workers"].items()}
    add_comparisons(result)
    rates = ", ".join(f"{r:.1f}" for r in result["machine"]["read_gb_s"])
    threads = result["config"]["threads"]
    print(f"{result['date']}, {result['cpu']}, {threads} threads, read GB/s {rates}")
    print(table(result))
    print(floor_note(result))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.from_json:
        report(json.loads(args.from_json.read_text()))
        return
    torch.set_num_threads(args.threads)
    if PEER in args.systems and not args.llamacpp_python.exists():
        sys.exit(f"{args.llamacpp_python} is missing: run benchmarks/peers/make-llamacpp-venv.sh")
    path = default_gguf_path()
    reader = gguf.GGUFReader(path)
    prompt = draw_prompt(reader, args.prompt_len, args.seed)
    base = {
        "model": str(path),
        "threads": args.threads,
        "seed": args.seed,
        "prompt": prompt,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "steer_layer": args.steer_layer,
        "steer_scale": args.steer_scale,
    }
    paths = ("out", "llamacpp_python", "from_json")
    config = {k: v for k, v in vars(args).items() if k not in paths}
    config["prompt_len"] = args.prompt_len
    result: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gguf_file": str(path),
        "config": config,
        "prompt": prompt,
        "weights_bytes": weight_bytes(reader),
        "kv_cache_fp32_bytes_at_mean_context": kv_cache_bytes(
            reader, args.prompt_len + args.new_tokens // 2
        ),
        "machine": {"read_gb_s": [read_rate_gb_s(), None]},
        "workers": {},
    }
    run_rounds(args, base, result)
    result["machine"]["read_gb_s"][1] = read_rate_gb_s()
    report(result)
    write(args.out, result)


if __name__ == "__main__":
    main()
