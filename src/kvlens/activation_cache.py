"""What ``run_with_cache`` returns: recorded activations keyed by hook name, and name helpers."""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)


class ActivationCache:
    """Activations recorded by ``run_with_cache``, keyed by hook name.

    Behaves like a read-only dict. Keys may also be given TransformerLens's short way:
    ``cache["pattern", 3]`` is ``cache["blocks.3.attn.hook_pattern"]``, ``cache["embed"]`` is
    ``cache["hook_embed"]`` and ``cache["resid_post", -1]`` is the last layer's.

    Attributes:
        model: The model that produced the activations.
        has_batch_dim: ``False`` when the batch axis was dropped (``remove_batch_dim=True``).
    """

    def __init__(
        self,
        activations: dict[str, Tensor],
        model: nn.Module | None = None,
        has_batch_dim: bool = True,
    ) -> None:
        self._acts = activations
        self.model = model
        self.has_batch_dim = has_batch_dim

    def __getitem__(self, key: str | tuple[Any, ...]) -> Tensor:
        if isinstance(key, str) and key in self._acts:
            return self._acts[key]
        name = self._full_name(key)
        try:
            return self._acts[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self._acts), n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise KeyError(f"no activation named {name!r} in this cache{hint}") from None

    def _full_name(self, key: str | tuple[Any, ...]) -> str:
        """The hook name a short key means: ``"embed"``, ``("pattern", -1)`` (the last layer)."""
        if isinstance(key, str):
            try:
                return get_act_name(key)
            except KeyError:
                return key  # not a short name either; the lookup reports it
        if len(key) > 1 and isinstance(key[1], int) and key[1] < 0:
            cfg = getattr(self.model, "cfg", None)
            if cfg is None:
                raise KeyError(f"a negative layer in {key!r} needs the cache's model's cfg")
            key = (key[0], cfg.n_layers + key[1], *key[2:])
        return get_act_name(*key)

    def __contains__(self, key: object) -> bool:
        return key in self._acts

    def __iter__(self) -> Iterator[str]:
        return iter(self._acts)

    def __len__(self) -> int:
        return len(self._acts)

    def keys(self) -> Any:
        """The hook names, as ``dict.keys()``."""
        return self._acts.keys()

    def values(self) -> Any:
        """The activations, as ``dict.values()``."""
        return self._acts.values()

    def items(self) -> Any:
        """``(hook name, activation)`` pairs, as ``dict.items()``."""
        return self._acts.items()

    def to(self, device: torch.device | str) -> ActivationCache:
        """A copy with every activation on ``device``."""
        moved = {k: v.to(device) for k, v in self._acts.items()}
        return ActivationCache(moved, self.model, self.has_batch_dim)

    def remove_batch_dim(self) -> ActivationCache:
        """Drop the batch axis of a batch-1 cache, in place; returns the cache.

        Raises:
            ValueError: If an activation's batch size is not 1.
        """
        if not self.has_batch_dim:
            logger.warning("remove_batch_dim: this cache has no batch axis any more")
            return self
        for name, act in self._acts.items():
            if act.shape[0] != 1:
                raise ValueError(
                    f"remove_batch_dim needs batch size 1; {name!r} has shape {tuple(act.shape)}"
                )
        self._acts = {name: act[0] for name, act in self._acts.items()}
        self.has_batch_dim = False
        return self

    def __repr__(self) -> str:
        return f"ActivationCache({len(self._acts)} activations)"


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
