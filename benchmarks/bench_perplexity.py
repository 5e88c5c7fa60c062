"""Benchmark: what rounding the default model's weights to blocks costs in perplexity.

The default model's fp32 weights (its GGUF file's Q4_1 blocks dequantized), against the same
weights rounded to Q8_0 (``quantize="q8_0"``) and to Q4_0 (for scale), over the fixed text
``tests/data/perplexity.txt`` (about 1,100 tokens, one pass): each one's perplexity, its change
against fp32, and how often its top-1 next token agrees with fp32's. The file's own blocks
(``quantized=True``) are the fp32 model itself (exact dequantization), so they are left out.

Usage::

    .venv/bin/python benchmarks/bench_perplexity.py [--out FILE.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch

from bench_generate import cpu_model
from kvlens.model import HookedTransformer

HERE = Path(__file__).resolve().parent
TEXT = HERE.parent / "tests" / "data" / "perplexity.txt"


def perplexity(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    """``exp`` of the mean negative log-likelihood of each next token."""
    log_probs = logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None])
    return log_probs.mean().neg().exp().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "results" / "perplexity.json")
    args = parser.parse_args()
    fp32 = HookedTransformer.from_pretrained_no_processing(progress=False)
    tokens = fp32.to_tokens(TEXT.read_text())
    with torch.inference_mode():
        reference = fp32(tokens)
    base = perplexity(reference, tokens)
    rows = [{"weights": "fp32", "perplexity": base, "change_pct": 0.0, "top1_agreement": 1.0}]
    for fmt in ("q8_0", "q4_0"):
        model = HookedTransformer.from_pretrained_no_processing(quantize=fmt, progress=False)
        with torch.inference_mode():
            logits = model(tokens)
        value = perplexity(logits, tokens)
        agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
        rows.append(
            {
                "weights": fmt,
                "perplexity": value,
                "change_pct": 100 * (value / base - 1),
                "top1_agreement": agree,
                "megabytes": sum(
                    {id(m.blocks): m.nbytes for m in model.quantized_weights.values()}.values()
                )
                / 1e6,
            }
        )
    record = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
        "cpu": cpu_model(),
        "text": str(TEXT.relative_to(HERE.parent)),
        "positions": tokens.shape[1] - 1,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{record['positions']} positions of {record['text']}, {record['date']}")
    print("| weights | perplexity | change vs fp32 | top-1 agreement |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['weights']} | {row['perplexity']:.3f} | {row['change_pct']:+.2f}% | "
            f"{100 * row['top1_agreement']:.1f}% |"
        )


if __name__ == "__main__":
    main()
