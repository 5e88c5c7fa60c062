"""Direct logit attribution: how much each head and each MLP writes towards the right answer.

The final residual stream at the last position is the sum of the embedding, every attention
head's output, every MLP's output and the output biases. The final norm divides that sum by one
scale, so, with the scale held fixed, each part's share of the logit difference between a
correct and an incorrect answer token is its own dot product with the difference of their
unembedding directions; the shares add up to the model's logit difference exactly.

    .venv/bin/python examples/direct_logit_attribution.py --top 10

TransformerLens users would write ``cache.logit_attrs(stack, correct, incorrect)``. That method
divides by the recorded scale only, which is exact for TransformerLens's default folded weights
(``fold_ln`` moves ``ln_final.w`` into ``W_U``). kvlens's ``from_pretrained`` folds them too
(``ln_final.w`` is then all ones), but this script multiplies by ``model.ln_final.w`` itself so
that it is also right on a model loaded with ``from_pretrained_no_processing``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from kvlens import HookedTransformer

DEFAULT_PROMPT = "The capital of France is"
DEFAULT_CORRECT = " Paris"
DEFAULT_INCORRECT = " London"


@dataclass(frozen=True)
class Attribution:
    """Each component's direct share of ``logit[correct] - logit[incorrect]`` at the last token."""

    labels: list[str]  # "L{layer}H{head}", "{layer}_mlp_out", "embed", "bias"
    attributions: torch.Tensor  # [component], in the order of `labels`
    unembed_bias_diff: float  # b_U[correct] - b_U[incorrect], which no component writes
    logit_diff: float  # the model's own logit difference

    @property
    def head_attributions(self) -> torch.Tensor:
        """``[n_layers, n_heads]``: the heads' shares, laid out by layer and head."""
        heads = [i for i, label in enumerate(self.labels) if label.startswith("L")]
        layers = 1 + max(int(self.labels[i][1:].split("H")[0]) for i in heads)
        return self.attributions[heads].reshape(layers, -1)

    def top(self, k: int) -> list[tuple[str, float]]:
        """The ``k`` components with the largest share in absolute value, largest first."""
        order = self.attributions.abs().argsort(descending=True)[:k]
        return [(self.labels[i], float(self.attributions[i])) for i in order]


@torch.no_grad()
def direct_logit_attribution(
    model: HookedTransformer, prompt: str, correct: str, incorrect: str
) -> Attribution:
    """Split the logit difference of ``correct`` over ``incorrect`` by component.

    Raises:
        ValueError: If an answer is not a single token (``to_single_token`` names it).
    """
    direction = model.tokens_to_residual_directions(
        model.to_single_token(correct)
    ) - model.tokens_to_residual_directions(model.to_single_token(incorrect))
    logits, cache = model.run_with_cache(prompt)
    stack, labels = cache.get_full_resid_decomposition(
        expand_neurons=False, pos_slice=-1, return_labels=True
    )  # [component, batch, d_model]: sums to the final residual at the last position
    # Divide by ln_final's recorded scale, then apply its weight: TransformerLens folds that
    # weight into W_U, kvlens's loaded weights keep it in the norm (RMSNorm has no bias to add).
    scaled = cache.apply_ln_to_stack(stack, layer=-1, pos_slice=-1) * model.ln_final.w
    attributions = (scaled[:, 0] * direction).sum(dim=-1)
    b_U = model.b_U
    correct_id, incorrect_id = model.to_single_token(correct), model.to_single_token(incorrect)
    return Attribution(
        labels=labels,
        attributions=attributions,
        unembed_bias_diff=float(b_U[correct_id] - b_U[incorrect_id]),
        logit_diff=float(logits[0, -1, correct_id] - logits[0, -1, incorrect_id]),
    )


def format_report(result: Attribution, top: int) -> str:
    """The largest shares, the per-layer totals and the check that everything adds up."""
    heads = result.head_attributions
    mlps = [
        float(a)
        for label, a in zip(result.labels, result.attributions, strict=True)
        if label.endswith("_mlp_out")
    ]
    lines = [f"{'component':>12}  {'logit diff':>10}"]
    lines += [f"{label:>12}  {value:10.3f}" for label, value in result.top(top)]
    lines.append("")
    lines.append(f"{'layer':>5}  {'heads':>7}  {'mlp':>7}  best head")
    for layer, (row, mlp) in enumerate(zip(heads, mlps, strict=True)):
        best = int(row.abs().argmax())
        lines.append(
            f"{layer:5d}  {float(row.sum()):7.3f}  {mlp:7.3f}  H{best} ({float(row[best]):+.3f})"
        )
    total = float(result.attributions.sum()) + result.unembed_bias_diff
    lines.append("")
    lines.append(f"sum of components + b_U difference: {total:.4f}")
    lines.append(f"the model's logit difference:        {result.logit_diff:.4f}")
    return "\n".join(lines)


def main(
    model: HookedTransformer | None = None,
    prompt: str = DEFAULT_PROMPT,
    correct: str = DEFAULT_CORRECT,
    incorrect: str = DEFAULT_INCORRECT,
    top: int = 10,
) -> Attribution:
    """Print the attribution of ``prompt`` and return it (loads the default model if needed)."""
    if model is None:
        model = HookedTransformer.from_pretrained(progress=False)
    result = direct_logit_attribution(model, prompt, correct, incorrect)
    print(f"prompt: {prompt!r}; logit[{correct!r}] - logit[{incorrect!r}]")
    print(format_report(result, top))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--correct", default=DEFAULT_CORRECT)
    parser.add_argument("--incorrect", default=DEFAULT_INCORRECT)
    parser.add_argument("--top", type=int, default=10, help="how many components to list")
    args = parser.parse_args()
    main(prompt=args.prompt, correct=args.correct, incorrect=args.incorrect, top=args.top)
