"""Pictures of one run: attention patterns and the logit lens, written as PNG files.

:func:`draw_pictures` does the whole job (prompt, optional greedy continuation, one recorded
pass, the files); :func:`attention_picture` and :func:`logit_lens_picture` draw from a recorded
:class:`~kvlens.activation_cache.ActivationCache` (:func:`record_run` makes one that holds what
they read).

Sizes are known before drawing: every figure is drawn at :data:`DPI` (100) on a size in inches
that is a multiple of 1/4, so the PNG is exactly :func:`attention_picture_size` or
:func:`logit_lens_picture_size` pixels. Both grow with the number of tokens (and layers) and
stop at a cap; past it the cells and their labels shrink.

matplotlib is an optional dependency (``pip install 'kvlens[plot]'``), imported when a picture is
drawn; the figures use the Agg canvas directly, never pyplot's global state.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from kvlens.activation_cache import ActivationCache

DPI = 100
# Attention: the square heat map is 1/4 inch a token plus 2 inches of labels and title, between
# 4 and 16 inches; the colour bar adds 1 inch of width.
_ATTN_PER_TOKEN, _ATTN_BASE, _ATTN_MIN, _ATTN_MAX, _ATTN_BAR = 0.25, 2.0, 4.0, 16.0, 1.0
# Logit lens: 3/4 inch a position (a token and its probability) by 1/4 inch a layer.
_LENS_PER_POS, _LENS_BASE_W, _LENS_MIN_W, _LENS_MAX_W = 0.75, 2.5, 4.0, 24.0
_LENS_PER_ROW, _LENS_BASE_H, _LENS_MIN_H, _LENS_MAX_H = 0.25, 1.5, 3.0, 16.0
_LABEL_CHARS = 12  # longer token strings are cut, ending in "…"


def _clamp(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))


def attention_picture_size(n_tokens: int) -> tuple[int, int]:
    """``(width, height)`` in pixels of an attention picture over ``n_tokens`` tokens.

    The height is ``100 * clamp(2 + n_tokens / 4, 4, 16)``; the width is 100 more (colour bar).
    """
    side = _clamp(_ATTN_BASE + _ATTN_PER_TOKEN * n_tokens, _ATTN_MIN, _ATTN_MAX)
    return round((side + _ATTN_BAR) * DPI), round(side * DPI)


def logit_lens_picture_size(n_rows: int, n_positions: int) -> tuple[int, int]:
    """``(width, height)`` in pixels of a logit-lens picture of ``n_rows`` residual streams.

    ``n_rows`` is ``n_layers + 1`` (each layer's input and the final residual). The width is
    ``100 * clamp(2.5 + 0.75 * n_positions, 4, 24)``, the height
    ``100 * clamp(1.5 + n_rows / 4, 3, 16)``.
    """
    width = _clamp(_LENS_BASE_W + _LENS_PER_POS * n_positions, _LENS_MIN_W, _LENS_MAX_W)
    height = _clamp(_LENS_BASE_H + _LENS_PER_ROW * n_rows, _LENS_MIN_H, _LENS_MAX_H)
    return round(width * DPI), round(height * DPI)


def check_layers_heads(model: Any, layers: Sequence[int], heads: Sequence[int]) -> None:
    """Raise ``ValueError`` naming the valid range when a layer or head is not in the model."""
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    for layer in layers:
        if not 0 <= layer < n_layers:
            raise ValueError(
                f"layer {layer} is out of range: this model has layers 0..{n_layers - 1}"
            )
    for head in heads:
        if not 0 <= head < n_heads:
            raise ValueError(f"head {head} is out of range: this model has heads 0..{n_heads - 1}")


def record_run(model: Any, tokens: Tensor, layers: Sequence[int]) -> tuple[Tensor, ActivationCache]:
    """One pass over ``tokens`` ``[1, pos]`` recording what the pictures read, nothing more.

    Records ``blocks.L.attn.hook_pattern`` of ``layers``, every ``hook_resid_pre`` and the last
    layer's ``hook_resid_post`` (the inputs of the logit lens). Every token counts as real: an
    EOS that is the pad token in a generated continuation is text, not padding.
    """
    n_layers = int(model.cfg.n_layers)
    names = {f"blocks.{layer}.attn.hook_pattern" for layer in layers}
    names |= {f"blocks.{i}.hook_resid_pre" for i in range(n_layers)}
    names.add(f"blocks.{n_layers - 1}.hook_resid_post")
    with torch.no_grad():
        logits, cache = model.run_with_cache(
            tokens, names_filter=sorted(names), attention_mask=torch.ones_like(tokens)
        )
    return logits, cache


def logit_lens(model: Any, cache: ActivationCache) -> tuple[Tensor, Tensor, list[str]]:
    """Each layer's residual read as the model's output: ``(probs, ids, labels)``.

    The residual before each layer and the final one (``cache.accumulated_resid`` with
    ``apply_ln=True``: each goes through ``ln_final``) times the unembedding. ``ids`` and
    ``probs`` are ``[n_layers + 1, pos]``: the top next token at each row and position and its
    probability (batch row 0); ``labels`` are ``accumulated_resid``'s (``"0_pre"`` ...
    ``"final_post"``). The last row is the model's own prediction.
    """
    stack, labels = cache.accumulated_resid(apply_ln=True, return_labels=True)
    probs, ids = [], []
    with torch.no_grad():
        for resid in stack:  # one row at a time: [batch, pos, d_vocab] at most
            top = model.unembed(resid[:1]).float().softmax(-1).max(-1)
            probs.append(top.values[0].cpu())
            ids.append(top.indices[0].cpu())
    return torch.stack(probs), torch.stack(ids), list(labels)


def _label(token: str) -> str:
    """A token as a label: whitespace visible, ``$`` not read as mathtext, long ones cut."""
    text = token.replace("\n", "\\n").replace("\t", "\\t").replace("$", r"\$")
    if not text.strip():  # only spaces (or nothing): show them
        text = text.replace(" ", "·") or "''"
    return text if len(text) <= _LABEL_CHARS else text[: _LABEL_CHARS - 1] + "…"


def _figure(size: tuple[int, int]) -> Any:
    """A constrained-layout figure of exactly ``size`` pixels on an Agg canvas."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("pictures need matplotlib: pip install 'kvlens[plot]'") from e
    fig = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    with warnings.catch_warnings():  # a token the font lacks is drawn as a box: no warning
        warnings.filterwarnings("ignore", message="Glyph .* missing")
        fig.savefig(path, dpi=DPI, format="png")
    return path


def attention_picture(
    model: Any,
    tokens: Tensor,
    cache: ActivationCache,
    layer: int,
    head: int,
    path: str | Path,
    n_prompt: int | None = None,
) -> Path:
    """Write a heat map of ``blocks.{layer}.attn.hook_pattern`` of ``head`` to ``path`` (PNG).

    Queries are rows, keys columns, both labelled with the tokens (``model.to_str_tokens``).
    With ``n_prompt`` less than the number of tokens a red line separates the prompt from the
    generated tokens, whose labels are red too. Size: :func:`attention_picture_size`.
    """
    check_layers_heads(model, [layer], [head])
    pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0, head].float().cpu()
    labels = [_label(t) for t in model.to_str_tokens(tokens[0])]
    n = len(labels)
    fig = _figure(attention_picture_size(n))
    ax = fig.add_subplot()
    image = ax.imshow(pattern.numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, shrink=0.8, label="attention")
    side = _clamp(_ATTN_BASE + _ATTN_PER_TOKEN * n, _ATTN_MIN, _ATTN_MAX)
    font = _clamp(0.6 * 72 * (side - _ATTN_BASE) / n, 3.0, 8.0)
    ax.set_xticks(range(n), labels, rotation=90, fontsize=font)
    ax.set_yticks(range(n), labels, fontsize=font)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    name = getattr(model.cfg, "model_name", "") or "model"
    ax.set_title(f"{name}: layer {layer}, head {head}", fontsize=10)
    if n_prompt is not None and 0 < n_prompt < n:
        ax.axvline(n_prompt - 0.5, color="red", linewidth=1)
        ax.axhline(n_prompt - 0.5, color="red", linewidth=1)
        for tick in (*ax.get_xticklabels()[n_prompt:], *ax.get_yticklabels()[n_prompt:]):
            tick.set_color("red")
    return _save(fig, path)


def logit_lens_picture(
    model: Any, tokens: Tensor, cache: ActivationCache, path: str | Path
) -> Path:
    """Write the logit lens (:func:`logit_lens`) as a layer × position grid to ``path`` (PNG).

    Each cell is coloured by the top token's probability and shows that token and the
    probability; columns are labelled with the input token at that position (the cell is the
    prediction of the token after it). Size: :func:`logit_lens_picture_size`.
    """
    probs, ids, rows = logit_lens(model, cache)
    columns = [_label(t) for t in model.to_str_tokens(tokens[0])]
    size = logit_lens_picture_size(len(rows), len(columns))
    fig = _figure(size)
    ax = fig.add_subplot()
    image = ax.imshow(probs.numpy(), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.invert_yaxis()  # the embedding at the bottom, the output at the top
    fig.colorbar(image, ax=ax, label="probability of the top token")
    cell_w = 72 * (size[0] / DPI - _LENS_BASE_W) / len(columns)  # points
    cell_h = 72 * (size[1] / DPI - _LENS_BASE_H) / len(rows)
    font = _clamp(min(cell_w / 5, cell_h / 2.4), 2.5, 6.0)  # two lines of ~8 characters
    for row in range(len(rows)):
        for pos in range(len(columns)):
            prob = float(probs[row, pos])
            top = _label(model.to_single_str_token(int(ids[row, pos])))
            colour = "black" if prob > 0.6 else "white"  # readable on viridis
            ax.text(
                pos,
                row,
                f"{top}\n{prob:.2f}",
                ha="center",
                va="center",
                fontsize=font,
                color=colour,
            )
    ax.set_xticks(range(len(columns)), columns, rotation=90, fontsize=_clamp(font + 2, 4, 8))
    ax.set_yticks(range(len(rows)), rows, fontsize=_clamp(font + 2, 4, 8))
    ax.set_xlabel("position (its input token); cells: predicted next token")
    ax.set_ylabel("residual stream")
    name = getattr(model.cfg, "model_name", "") or "model"
    ax.set_title(f"{name}: logit lens", fontsize=10)
    return _save(fig, path)


def draw_pictures(
    model: Any,
    prompt: str | Tensor,
    out_dir: str | Path,
    layers: Sequence[int] = (0,),
    heads: Sequence[int] = (0,),
    max_new_tokens: int = 0,
    stop_at_eos: bool = True,
) -> list[Path]:
    """Run ``prompt``, continue it greedily, and write its pictures into ``out_dir``.

    ``max_new_tokens`` tokens are generated first (greedy, ``do_sample=False``); then one pass
    over prompt and continuation (:func:`record_run`) feeds ``attention_L{layer}_H{head}.png``
    for every layer and head asked for, and ``logit_lens.png``.

    Args:
        model: A :class:`~kvlens.model.HookedTransformer` with a tokenizer.
        prompt: Text (tokenized with ``model.to_tokens``) or tokens ``[1, pos]``.
        out_dir: Created if missing.
        layers, heads: Which attention patterns to draw; checked before anything runs.
        max_new_tokens: Tokens to generate after the prompt (0: the prompt only).
        stop_at_eos: Stop generating at an EOS token.

    Returns:
        The paths written: the attention pictures (by layer, then head), then the logit lens.
    """
    check_layers_heads(model, layers, heads)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    tokens = model.to_tokens(prompt, truncate=False) if isinstance(prompt, str) else prompt
    if tokens.ndim != 2 or tokens.shape[0] != 1 or tokens.shape[1] == 0:
        raise ValueError(f"pictures take one non-empty prompt, got tokens {tuple(tokens.shape)}")
    n_prompt = int(tokens.shape[1])
    if max_new_tokens > 0:
        tokens = model.generate(
            tokens,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            stop_at_eos=stop_at_eos,
            return_type="tokens",
            verbose=False,
            attention_mask=torch.ones_like(tokens),
        )
    _, cache = record_run(model, tokens, layers)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        attention_picture(
            model,
            tokens,
            cache,
            layer,
            head,
            out / f"attention_L{layer}_H{head}.png",
            n_prompt=n_prompt,
        )
        for layer in layers
        for head in heads
    ]
    paths.append(logit_lens_picture(model, tokens, cache, out / "logit_lens.png"))
    return paths
