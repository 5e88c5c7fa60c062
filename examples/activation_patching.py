"""Activation patching of single heads: which heads carry the answer from a clean prompt?

The model reads a clean prompt ("The capital of France is", answer " Paris") and a corrupted one
of the same length ("The capital of Germany is", answer " Berlin"). The metric is the logit
difference ``logit[" Paris"] - logit[" Berlin"]`` at the last position. For every layer and head,
the corrupted run is repeated with that one head's output (``hook_z``, at every position) taken
from the clean run; the table reports how much of the clean metric that restores:

    recovery = (patched - corrupted) / (clean - corrupted)

0 means the head's clean output changes nothing, 1 that it alone restores the clean answer.

    .venv/bin/python examples/activation_patching.py --layers 20-29

Rather than 270 separate runs, each layer is one batched run with a row per head, started at
that layer from the corrupted residual stream (``start_at_layer``: the layers before it are
untouched by the patch) and stopped before the unembedding (``stop_at_layer``), so only the two
answer logits are computed. The plain TransformerLens way, one ``run_with_hooks`` per head, gives
the same numbers (the test compares them).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kvlens import HookedTransformer, get_act_name
from kvlens.hooks import HookPoint

CLEAN_PROMPT = "The capital of France is"
CORRUPTED_PROMPT = "The capital of Germany is"
CLEAN_ANSWER = " Paris"
CORRUPTED_ANSWER = " Berlin"


@dataclass(frozen=True)
class PatchingResult:
    """Head-patching recoveries, with the metrics they are measured between."""

    layers: list[int]
    recovery: Tensor  # [len(layers), n_heads]
    patched_metric: Tensor  # [len(layers), n_heads]
    clean_metric: float
    corrupted_metric: float


def logit_diff(
    model: HookedTransformer, final_resid: Tensor, correct: int, incorrect: int
) -> Tensor:
    """``logit[correct] - logit[incorrect]`` at the last position of each row, from the residual
    stream that enters the final norm (``[batch, pos, d_model]``): only two logits are made."""
    direction = model.W_U[:, correct] - model.W_U[:, incorrect]
    normalized = model.ln_final(final_resid[:, -1:])[:, 0]
    return normalized @ direction + (model.b_U[correct] - model.b_U[incorrect])


def patch_head_hook(clean_z: Tensor, heads: Sequence[int]):
    """A ``hook_z`` hook that gives row ``i`` of the batch head ``heads[i]``'s clean output."""
    rows = torch.arange(len(heads))
    head_index = torch.as_tensor(heads)

    def hook(z: Tensor, hook: HookPoint) -> Tensor:
        z = z.clone()
        z[rows, :, head_index] = clean_z[0, :, head_index].transpose(0, 1).to(z.dtype)
        return z

    return hook


@torch.no_grad()
def patch_heads(
    model: HookedTransformer,
    clean: str = CLEAN_PROMPT,
    corrupted: str = CORRUPTED_PROMPT,
    correct: str = CLEAN_ANSWER,
    incorrect: str = CORRUPTED_ANSWER,
    layers: Sequence[int] | None = None,
) -> PatchingResult:
    """Patch each head of ``layers`` (default: all) from ``clean`` into ``corrupted``.

    Raises:
        ValueError: If the prompts differ in token length or an answer is not one token.
    """
    clean_tokens, corrupted_tokens = model.to_tokens(clean), model.to_tokens(corrupted)
    if clean_tokens.shape != corrupted_tokens.shape:
        raise ValueError(
            f"the prompts must have one token length; the clean one has "
            f"{clean_tokens.shape[1]} tokens, the corrupted one {corrupted_tokens.shape[1]}"
        )
    correct_id, incorrect_id = model.to_single_token(correct), model.to_single_token(incorrect)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    layers = list(range(n_layers) if layers is None else layers)

    def metric(final_resid: Tensor) -> Tensor:
        return logit_diff(model, final_resid, correct_id, incorrect_id)

    _, clean_cache = model.run_with_cache(
        clean_tokens, names_filter=lambda name: name.endswith("hook_z")
    )
    _, corrupted_cache = model.run_with_cache(
        corrupted_tokens, names_filter=lambda name: name.endswith("resid_pre")
    )
    clean_metric = float(metric(model(clean_tokens, stop_at_layer=n_layers)))
    corrupted_metric = float(metric(model(corrupted_tokens, stop_at_layer=n_layers)))
    heads = list(range(n_heads))
    patched = torch.empty(len(layers), n_heads)
    for row, layer in enumerate(layers):
        resid = corrupted_cache["resid_pre", layer].expand(n_heads, -1, -1)
        final = model.run_with_hooks(
            resid,
            start_at_layer=layer,
            stop_at_layer=n_layers,
            fwd_hooks=[(get_act_name("z", layer), patch_head_hook(clean_cache["z", layer], heads))],
        )
        patched[row] = metric(final).float().cpu()
    recovery = (patched - corrupted_metric) / (clean_metric - corrupted_metric)
    return PatchingResult(layers, recovery, patched, clean_metric, corrupted_metric)


def format_table(result: PatchingResult) -> str:
    """Recoveries as a layer-by-head table."""
    n_heads = result.recovery.shape[1]
    lines = [
        f"clean logit diff {result.clean_metric:.3f}, corrupted {result.corrupted_metric:.3f}; "
        "recovery when one head's z is patched from clean into corrupted:",
        "layer " + "".join(f"{f'H{h}':>7}" for h in range(n_heads)),
    ]
    for layer, row in zip(result.layers, result.recovery, strict=True):
        lines.append(f"{layer:5d} " + "".join(f"{float(v):7.3f}" for v in row))
    return "\n".join(lines)


def main(
    model: HookedTransformer | None = None,
    clean: str = CLEAN_PROMPT,
    corrupted: str = CORRUPTED_PROMPT,
    correct: str = CLEAN_ANSWER,
    incorrect: str = CORRUPTED_ANSWER,
    layers: Sequence[int] | None = None,
) -> PatchingResult:
    """Print the head-patching table and return it (loads the default model if needed)."""
    if model is None:
        model = HookedTransformer.from_pretrained(progress=False)
    result = patch_heads(model, clean, corrupted, correct, incorrect, layers)
    print(format_table(result))
    return result


def _layer_range(text: str) -> list[int]:
    start, _, stop = text.partition("-")
    return list(range(int(start), int(stop or start) + 1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clean", default=CLEAN_PROMPT)
    parser.add_argument("--corrupted", default=CORRUPTED_PROMPT)
    parser.add_argument("--correct", default=CLEAN_ANSWER)
    parser.add_argument("--incorrect", default=CORRUPTED_ANSWER)
    parser.add_argument("--layers", type=_layer_range, help="e.g. 20-29 (default: all)")
    args = parser.parse_args()
    main(None, args.clean, args.corrupted, args.correct, args.incorrect, args.layers)
