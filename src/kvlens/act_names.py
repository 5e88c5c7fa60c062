"""Activation names: TransformerLens's short-name grammar (``get_act_name``) and position slices.

``get_act_name("pattern", 3)`` is ``blocks.3.attn.hook_pattern``; :func:`position_index` and
:func:`slice_positions` apply ``run_with_cache``'s ``pos_slice`` to recorded activations.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

# TransformerLens's short-name grammar: other spellings of activation names, of layer types,
# and which names live inside a block's attention, MLP or norms.
_NAME_ALIASES = {
    "attn": "pattern",
    "attn_logits": "attn_scores",
    "key": "k",
    "query": "q",
    "value": "v",
    "mlp_pre": "pre",
    "mlp_mid": "mid",
    "mlp_post": "post",
}
_LAYER_TYPE_ALIASES = {
    "a": "attn",
    "attention": "attn",
    "m": "mlp",
    "b": "",
    "block": "",
    "blocks": "",
}
_ATTN_NAMES = ("k", "v", "q", "z", "rot_k", "rot_q", "result", "pattern", "attn_scores")
_MLP_NAMES = ("pre", "post", "mid", "pre_linear")
_NORM_NAMES = ("scale", "normalized")
# "k6", "scale4ln1", "pre5": a word, a layer, then a layer type.
_COMPACT = re.compile(r"([a-z]+)(\d+)([a-z]?.*)")


def get_act_name(name: str, layer: int | str | None = None, layer_type: str | None = None) -> str:
    """Full hook name from TransformerLens's short forms.

    ``get_act_name("pattern", 3)`` is ``blocks.3.attn.hook_pattern``; ``"k6"`` is
    ``blocks.6.attn.hook_k``; ``("scale", 4, "ln1")`` and ``"scale4ln1"`` are
    ``blocks.4.ln1.hook_scale``; ``"embed"`` is ``hook_embed``. The aliases TransformerLens
    accepts work too (``"attn"`` for the pattern, ``"attn_logits"`` for the scores, ``"key"``,
    ``"query"``, ``"value"``, ``"mlp_pre"``, ``"mlp_post"``; layer types ``"a"``, ``"m"``). A
    full name is returned as it is. The name is not checked against a model: a cache lookup
    reports one that does not exist.

    One difference: a norm's activation (``"scale"``, ``"normalized"``) with a layer and no
    layer type means ``ln1``'s, where TransformerLens gives ``blocks.{layer}.hook_scale``, a name
    no model has. With no layer they mean ``ln_final``'s, as in TransformerLens.
    """
    if ("." in name or name.startswith("hook_")) and layer is None and layer_type is None:
        return name
    compact = _COMPACT.match(name)
    if compact is not None:
        name, layer, layer_type = compact.group(1), compact.group(2), compact.group(3) or None
    name = _NAME_ALIASES.get(name, name)
    if name in _ATTN_NAMES:
        layer_type = "attn"
    elif name in _MLP_NAMES:
        layer_type = "mlp"
    elif layer_type in _LAYER_TYPE_ALIASES:
        layer_type = _LAYER_TYPE_ALIASES[layer_type]
    elif name in _NORM_NAMES and layer is not None and not layer_type:
        layer_type = "ln1"
    parts = [] if layer is None else ["blocks", str(layer)]
    if layer_type:
        parts.append(layer_type)
    parts.append(f"hook_{name}")
    if name in _NORM_NAMES and layer is None:
        parts.insert(0, "ln_final")
    return ".".join(parts)


# Hook points whose activation is [..., pos, head, d_head]: their position axis is -3. Every
# other one (the residual stream, MLP, scale, and scores/pattern, whose -2 axis is the query
# position) has it at -2. TransformerLens's rule, except that it leaves out hook_rot_q and
# hook_rot_k (and so slices their head axis); here they are sliced on positions like hook_q.
_HEAD_AXIS_HOOKS = (
    "hook_q",
    "hook_k",
    "hook_v",
    "hook_z",
    "hook_result",
    "hook_rot_q",
    "hook_rot_k",
)

PosSlice = int | tuple[int | None, ...] | slice | list[int] | Tensor | None


def position_index(pos_slice: PosSlice) -> slice | Tensor | None:
    """An index for the position axis from TransformerLens's ``pos_slice`` forms.

    ``None`` keeps everything; an int keeps that position (and the axis, as TransformerLens's
    ``Slice.unwrap`` does); a tuple is ``slice(*t)``; a slice is used as is; a list, tensor or
    array holds the positions to keep.
    """
    if pos_slice is None or isinstance(pos_slice, slice):
        return pos_slice
    if isinstance(pos_slice, int):
        return torch.tensor([pos_slice])
    if isinstance(pos_slice, tuple):
        return slice(*pos_slice)
    if isinstance(pos_slice, (list, Tensor)) or hasattr(pos_slice, "__array__"):
        index = torch.as_tensor(pos_slice, dtype=torch.long)
        if index.ndim != 1:
            raise ValueError(f"pos_slice as indices must be 1-D, got shape {tuple(index.shape)}")
        return index
    raise TypeError(
        "pos_slice must be None, an int, a (start, stop[, step]) tuple, a slice, or a list or "
        f"tensor of positions; got {type(pos_slice).__name__}"
    )


def slice_positions(tensor: Tensor, name: str, index: slice | Tensor, ndim: int) -> Tensor:
    """``tensor`` indexed by ``index`` on the position axis of hook point ``name``.

    ``ndim`` is the activation's rank as the hook saw it (before any batch axis was dropped);
    an activation with fewer axes than the position axis needs is returned unchanged.
    """
    dim = -3 if name.endswith(_HEAD_AXIS_HOOKS) else -2
    if ndim < -dim:
        return tensor
    return tensor[(slice(None),) * (tensor.ndim + dim) + (index,)]


# Hook points whose activation is ``[batch, head_index, query_pos, key_pos]``; every other one
# has its position axis at 1 (``[batch, pos, ...]``).
ATTENTION_MAP_HOOKS = ("hook_attn_scores", "hook_pattern")


def is_attention_map(name: str) -> bool:
    """Whether hook point ``name`` holds ``[batch, head_index, query_pos, key_pos]``."""
    return name.endswith(ATTENTION_MAP_HOOKS)
