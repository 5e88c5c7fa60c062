"""Render the generation benchmark's JSON as markdown tables and a plot, without rerunning it.

The floor of each row is computed here from the shape and the rates measured in the run (the
higher of the measurements at its start and end: the floor is the best this machine showed).

Usage::

    .venv/bin/python benchmarks/render_generate.py [--results benchmarks/results/generate.json]
        [--markdown docs/benchmarks_generate.md] [--plot docs/img/decode_vs_context.png]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import floor
from model_shapes import SHAPES, TITLES

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LABELS = {
    "kvlens": "kvlens",
    "kvlens-real": "kvlens, real weights",
    "tl": "TransformerLens 2.18",
    "hf-dynamic": "HF DynamicCache",
    "hf-static": "HF static cache",
}
PEERS = ("tl", "hf-dynamic", "hf-static")


def rates(meta: dict[str, Any]) -> dict[str, float]:
    """The floor's rates: the higher of the run's first and last measurement of each."""
    measured = [m for m in (meta.get("machine_before"), meta.get("machine_after")) if m]
    return {k: max(m[k] for m in measured) for k in ("read_gb_s", "matmul_gflop_s")}


def add_floors(results: dict[str, Any]) -> None:
    """Add each grid row's and sweep point's floor (decode at the mean context of its steps)."""
    machine = rates(results["meta"])
    for row in results["grid"]:
        shape = SHAPES[row["shape_name"]]
        context = row["prompt"] + row["new_tokens"] // 2
        row["floor"] = floor.decode_floor(shape, row["batch"], context, machine)
        row["prefill_floor_ms"] = floor.prefill_floor_ms(
            shape, row["batch"], row["prompt"], machine
        )
        if row.get("read_gb_s_beside"):
            beside = {**machine, "read_gb_s": max(row["read_gb_s_beside"])}
            row["floor_beside"] = floor.decode_floor(shape, row["batch"], context, beside)
    for row in results["sweep"]:
        shape = SHAPES[row["shape_name"]]
        for point in row["points"]:
            context = point["context"] + row["sweep_steps"] // 2
            point["floor_ms"] = floor.decode_floor(shape, row["batch"], context, machine)[
                "floor_ms"
            ]
            if point.get("read_gb_s_beside"):
                beside = {**machine, "read_gb_s": max(point["read_gb_s_beside"])}
                point["floor_beside_ms"] = floor.decode_floor(shape, row["batch"], context, beside)[
                    "floor_ms"
                ]


def _ms(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "—"


def _cell(row: dict[str, Any] | None) -> str:
    """A row's decode ms/step, or why it has none."""
    if row is None:
        return "—"
    if row.get("decode_ms") is None:
        return row["status"]
    return _ms(row["decode_ms"])


def _index(rows: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    return {(r["shape_name"], r["batch"], r["prompt"], r["system"]): r for r in rows}


def decode_table(results: dict[str, Any], shape_name: str) -> str:
    """One line per (batch, prompt): the floor, kvlens over it, each peer over kvlens."""
    rows = [r for r in results["grid"] if r["shape_name"] == shape_name]
    systems = [s for s in LABELS if any(r["system"] == s for r in rows)]
    by_key = _index(rows)
    head = ["batch", "prompt", "floor ms"]
    for s in systems:
        head.append(f"{LABELS[s]} ms")
        head.append("÷ floor" if s in ("kvlens", "kvlens-real") else "÷ kvlens")
        if s in ("kvlens", "kvlens-real"):
            head.append("÷ floor beside")
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for batch, prompt in sorted({(r["batch"], r["prompt"]) for r in rows}):
        some = next(r for r in rows if r["batch"] == batch and r["prompt"] == prompt)
        floor_ms = some["floor"]["floor_ms"]
        ours = by_key.get((shape_name, batch, prompt, "kvlens"), {}).get("decode_ms")
        cells = [str(batch), str(prompt), _ms(floor_ms)]
        for s in systems:
            row = by_key.get((shape_name, batch, prompt, s))
            ms = row.get("decode_ms") if row else None
            cells.append(_cell(row))
            cells.append(
                _ratio(ms, floor_ms) if s in ("kvlens", "kvlens-real") else _ratio(ms, ours)
            )
            if s in ("kvlens", "kvlens-real"):
                cells.append(_ratio(ms, _floor_beside(row)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def full_table(results: dict[str, Any]) -> str:
    """Every grid row with all its figures."""
    by_key = _index(results["grid"])
    head = [
        "shape", "batch", "prompt", "system", "runs", "prefill ms", "decode ms/step", "tokens/s",
        "peak RSS MB", "peak − before MB", "floor ms", "÷ floor", "÷ kvlens",
        "read GB/s beside", "floor beside ms", "÷ floor beside",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---|---:|---:|---|" + "---:|" * (len(head) - 4)]
    for r in results["grid"]:
        mem = r.get("memory") or {}
        peak, before = mem.get("peak_rss_mb"), mem.get("rss_before_mb")
        ours = by_key.get((r["shape_name"], r["batch"], r["prompt"], "kvlens"), {})
        decode = r.get("decode_ms")
        floor_ms = r["floor"]["floor_ms"] if "floor" in r else None
        runs = str(r["runs"]) if r["status"] == "ok" else f"{r['runs']} ({r['status']})"
        cells = [
            r["shape_name"],
            str(r["batch"]),
            str(r["prompt"]),
            LABELS[r["system"]],
            runs,
            _ms(r.get("prefill_ms")),
            _ms(decode),
            f"{r['tokens_per_s']:.1f}" if r.get("tokens_per_s") else "—",
            f"{peak:.0f}" if peak else "—",
            f"{peak - before:.0f}" if peak and before else "—",
            _ms(floor_ms),
            _ratio(decode, floor_ms),
            "—" if r["system"] == "kvlens" else _ratio(decode, ours.get("decode_ms")),
            " / ".join(f"{v:.1f}" for v in r.get("read_gb_s_beside", [])) or "—",
            _ms(_floor_beside(r)),
            _ratio(decode, _floor_beside(r)),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _floor_beside(row: dict[str, Any] | None) -> float | None:
    """The row's floor at the read rate measured beside it (older results have none)."""
    return row["floor_beside"]["floor_ms"] if row and "floor_beside" in row else None


def sweep_table(results: dict[str, Any], shape_name: str) -> str:
    rows = [r for r in results["sweep"] if r["shape_name"] == shape_name]
    systems = [r["system"] for r in rows]
    points = {(r["system"], p["context"]): p for r in rows for p in r["points"]}
    contexts = sorted({p["context"] for r in rows for p in r["points"]})
    head = ["context", "floor ms", *(f"{LABELS[s]} ms" for s in systems), "kvlens ÷ floor"]
    head.append("kvlens ÷ floor beside")
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for c in contexts:
        floor_ms = next((points[s, c]["floor_ms"] for s in systems if (s, c) in points), None)
        ms = [points[s, c]["decode_ms"] if (s, c) in points else None for s in systems]
        ours = points.get(("kvlens", c), {})
        beside = ours.get("floor_beside_ms")
        cells = [str(c), _ms(floor_ms), *map(_ms, ms), _ratio(ours.get("decode_ms"), floor_ms)]
        cells.append(_ratio(ours.get("decode_ms"), beside))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_tables(results: dict[str, Any]) -> str:
    """The decode tables per shape, the full grid and the sweep, as markdown."""
    parts = []
    shapes = [s for s in SHAPES if any(r["shape_name"] == s for r in results["grid"])]
    for s in shapes:
        parts += [f"### Decode ms/step: {TITLES[s]}", decode_table(results, s)]
    if results["grid"]:
        parts += ["### All figures", full_table(results)]
    for s in [s for s in SHAPES if any(r["shape_name"] == s for r in results["sweep"])]:
        parts += [f"### Decode ms/step against context, batch 1: {TITLES[s]}"]
        parts += [sweep_table(results, s)]
    return "\n\n".join(parts) + "\n"


def headline(results: dict[str, Any]) -> str:
    """One sentence for the README: SmolLM2's shape, batch 1, prompt 128 where measured."""
    by_key = _index(results["grid"])
    keys = sorted({k[:3] for k in by_key if k[3] == "kvlens" and by_key[k].get("decode_ms")})
    if not keys:
        return "No kvlens row was measured."
    preferred = ("smollm2-135m", 1, 128)
    shape_name, batch, prompt = preferred if preferred in keys else keys[0]
    ours = by_key[shape_name, batch, prompt, "kvlens"]
    peers = []
    for s in PEERS:
        row = by_key.get((shape_name, batch, prompt, s))
        if row and row.get("decode_ms"):
            peers.append(f"{LABELS[s]} {_ratio(row['decode_ms'], ours['decode_ms'])}")
    text = (
        f"{TITLES[shape_name]}, batch {batch}, prompt {prompt}, fp32 on "
        f"{results['meta']['cores']} CPU cores: kvlens decodes at {_ms(ours['decode_ms'])} ms "
        f"per step, {_ratio(ours['decode_ms'], ours['floor']['floor_ms'])} the floor of "
        f"{_ms(ours['floor']['floor_ms'])} ms, and generates {ours['new_tokens']} tokens at "
        f"{ours['tokens_per_s']:.1f} tokens/s."
    )
    if "floor_beside" in ours:
        text += (
            f" At the read rate measured beside that row "
            f"({max(ours['read_gb_s_beside']):.1f} GB/s), the floor is "
            f"{_ms(_floor_beside(ours))} ms and kvlens "
            f"{_ratio(ours['decode_ms'], _floor_beside(ours))} of it."
        )
    if peers:
        text += " Time per decode step relative to kvlens: " + ", ".join(peers) + "."
    return text


def versions(results: dict[str, Any]) -> str:
    infos = [r["info"] for r in results["grid"] + results["sweep"] if r.get("info")]

    def first(key: str, systems: tuple[str, ...]) -> str:
        rows = results["grid"] + results["sweep"]
        found = [r["info"].get(key) for r in rows if r["system"] in systems and r.get("info")]
        return next((v for v in found if v), "—")

    kvlens = next((i["kvlens"] for i in infos if i.get("kvlens")), "—")
    meta = results["meta"]
    return (
        f"kvlens {kvlens} ({meta.get('kvlens_revision', '?')}), "
        f"torch {first('torch', ('kvlens', 'kvlens-real'))}; "
        f"peers: TransformerLens {first('transformer_lens', ('tl',))}, "
        f"transformers {first('transformers', PEERS)}, torch {first('torch', PEERS)}; "
        f"Python {meta['python']}"
    )


def plot(results: dict[str, Any], path: Path) -> bool:
    """Decode ms/step against context, one panel per shape, the floor dashed; False if no sweep."""
    shapes = [
        s for s in SHAPES if any(r["shape_name"] == s and r["points"] for r in results["sweep"])
    ]
    if not shapes:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    for ax, shape_name in zip(axes[0], shapes, strict=True):
        rows = [r for r in results["sweep"] if r["shape_name"] == shape_name and r["points"]]
        for r in rows:
            xs = [p["context"] for p in r["points"]]
            ax.plot(xs, [p["decode_ms"] for p in r["points"]], "o-", label=LABELS[r["system"]])
        if rows:
            longest = max(rows, key=lambda r: len(r["points"]))["points"]
            xs = [p["context"] for p in longest]
            ax.plot(xs, [p["floor_ms"] for p in longest], "k--", label="floor")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        contexts = sorted({p["context"] for r in rows for p in r["points"]})
        ax.set_xticks(contexts, [str(c) for c in contexts])
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("decode ms/step (batch 1)")
        ax.set_title(TITLES[shape_name], fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def report(results: dict[str, Any], plot_link: str | None) -> str:
    """The whole markdown page: machine, versions, command, method, tables, plot."""
    meta = results["meta"]
    machine = rates(meta)
    s = meta["settings"]
    warning = (
        "> **Quick smoke settings: these numbers are not benchmark results.**\n\n"
        if meta.get("quick")
        else ""
    )
    return f"""# Generation speed: kvlens, TransformerLens and Hugging Face, beside the floor

{warning}{headline(results)}

- Machine: {meta["cpu"]}, {meta["cores"]} cores, {meta["threads"]} torch threads, fp32.
- Versions: {versions(results)}.
- Date: {meta["date"]}; the run took {meta.get("wall_s", 0) / 60:.0f} minutes;
  load average before/after: {_load(meta.get("loadavg_before"))} / \
{_load(meta.get("loadavg_after"))}.
- Command: `{meta["command"]}`, then `{_python(meta)} benchmarks/render_generate.py`.
- Floor rates measured in the run: read {machine["read_gb_s"]:.1f} GB/s (`sum` over 1 GiB),
  matmul {machine["matmul_gflop_s"]:.0f} GFLOP/s (fp32 2048 x 2048).

Grid: batch {s["batches"]}, prompt {s["prompts"]}, {s["new_tokens"]} new tokens, greedy; each
figure is the median of up to {s["repeats"]} runs (the runs column; fewer where a configuration
would pass {s["config_budget"]:.0f} s). Prefill: from the generate call to the first token's
logits. Decode ms/step: from the first token's logits to the last, over {s["new_tokens"]} - 1
steps. Tokens/s: batch x new tokens over the whole generate call. Each system and shape runs in
its own process, which builds the model once and runs the configurations smallest first. Peak RSS:
that process's peak resident memory during a configuration's runs (the kernel's peak counter
reset, and freed memory trimmed, just before them; weights and runtime included); "peak − before"
is the part above its resident size just before. Floor: the bytes a step reads (all weights but
the embedding table, plus the cached keys and values at the mean context, prompt +
{s["new_tokens"] // 2}) over the read bandwidth, or its FLOPs over the matmul rate, whichever is
larger; the read bandwidth is the higher of the run's first and last measurement. "÷ floor" is
a system's decode ms/step over the floor, "÷ kvlens" over kvlens's. The machine's bandwidth
drifts with the load of the host it shares, so each configuration's read rate is also measured
just before and just after it (a `sum` over 256 MB, "read GB/s beside"); "floor beside" is the
floor at the higher of those two, the floor under the conditions the row ran in.

{markdown_tables(results)}{_sweep_note(s, plot_link)}"""


def _sweep_note(settings: dict[str, Any], plot_link: str | None) -> str:
    if not plot_link:
        return ""
    steps = settings["sweep_steps"]
    return (
        f"\nSweep: batch 1, a prefill of each context length, then {steps} decode steps, their "
        f"median; floor at the context + {steps // 2}.\n\n"
        f"![decode ms/step against context length]({plot_link})\n"
    )


def _python(meta: dict[str, Any]) -> str:
    return meta["command"].split(" ", 1)[0]


def _load(values: list[float] | None) -> str:
    return " ".join(f"{v:.2f}" for v in values) if values else "?"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=HERE / "results" / "generate.json")
    p.add_argument("--markdown", type=Path, default=ROOT / "docs" / "benchmarks_generate.md")
    p.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "decode_vs_context.png")
    args = p.parse_args(argv)
    results = json.loads(args.results.read_text())
    add_floors(results)
    link = os.path.relpath(args.plot, args.markdown.parent) if plot(results, args.plot) else None
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text(report(results, link))
    print(f"wrote {args.markdown}" + (f" and {args.plot}" if link else " (no sweep, no plot)"))


if __name__ == "__main__":
    main()
