"""Logit lens: what the model would predict if it stopped after each layer.

The residual stream entering each layer (and the final one) goes through the final norm and the
unembedding, as the real output does; the table shows each layer's top token for the last
position and the probability it gives the token the model finally predicts.

    .venv/bin/python examples/logit_lens.py --prompt "The capital of France is"

TransformerLens users will recognise ``cache.accumulated_resid(apply_ln=True)``: at the final
residual kvlens runs every component through ``ln_final`` itself (its own statistics and its
weight), so the lens is right on weights as loaded, which kvlens does not fold yet.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from kvlens import HookedTransformer

DEFAULT_PROMPT = "The capital of France is"


@dataclass(frozen=True)
class LensRow:
    """One residual stream read through the unembedding at the last position."""

    label: str  # "{layer}_pre" (entering that layer) or "final_post"
    top_token: str
    top_prob: float
    answer_prob: float  # probability of the model's actual prediction
    answer_rank: int  # 0: the answer is this row's top token


@dataclass(frozen=True)
class LogitLens:
    """The lens of one prompt: a row per layer, and what the model itself predicts."""

    prompt: str
    answer: str  # the model's top next token
    rows: list[LensRow]
    lens_logits: torch.Tensor  # [n_layers + 1, d_vocab], the last row is the model's own
    model_logits: torch.Tensor  # [d_vocab], the model's logits at the last position


@torch.no_grad()
def logit_lens(model: HookedTransformer, prompt: str) -> LogitLens:
    """Each layer's residual at the last position, read through ``ln_final`` and ``W_U``."""
    logits, cache = model.run_with_cache(
        prompt, names_filter=lambda name: "resid" in name or name.startswith("ln_final")
    )
    resid, labels = cache.accumulated_resid(apply_ln=True, pos_slice=-1, return_labels=True)
    lens_logits = resid[:, 0] @ model.W_U + model.b_U  # [component, d_vocab]
    model_logits = logits[0, -1]
    answer = int(model_logits.argmax())
    probs = lens_logits.softmax(dim=-1)
    ranks = (lens_logits > lens_logits[:, answer, None]).sum(dim=-1)
    rows = [
        LensRow(
            label=label,
            top_token=model.to_single_str_token(int(row.argmax())),
            top_prob=float(row.max()),
            answer_prob=float(row[answer]),
            answer_rank=int(rank),
        )
        for label, row, rank in zip(labels, probs, ranks, strict=True)
    ]
    return LogitLens(prompt, model.to_single_str_token(answer), rows, lens_logits, model_logits)


def format_table(lens: LogitLens) -> str:
    """The lens as a plain-text table."""
    lines = [
        f"prompt: {lens.prompt!r}; the model predicts {lens.answer!r}",
        f"{'residual':>10}  {'top token':<14} {'p(top)':>7}  {'p(answer)':>9}  {'rank':>5}",
    ]
    for row in lens.rows:
        lines.append(
            f"{row.label:>10}  {row.top_token!r:<14} {row.top_prob:7.3f}  "
            f"{row.answer_prob:9.3f}  {row.answer_rank:5d}"
        )
    return "\n".join(lines)


def main(model: HookedTransformer | None = None, prompt: str = DEFAULT_PROMPT) -> LogitLens:
    """Print the logit lens of ``prompt`` and return it (loads the default model if needed)."""
    if model is None:
        model = HookedTransformer.from_pretrained(progress=False)
    lens = logit_lens(model, prompt)
    print(format_table(lens))
    return lens


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    main(prompt=parser.parse_args().prompt)
