"""Key/value patching: which layers, heads and positions of one cache to copy into another.

:meth:`KeyValueCache.patch_from` turns a selection into index tensors here, checking every part
of it against both caches before anything is written, then asks each target entry to copy
(:meth:`KeyValueCacheEntry.patch`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
from jaxtyping import Int
from torch import Tensor

if TYPE_CHECKING:
    from kvlens.cache.cache import KeyValueCache

Selection = int | Sequence[int] | Tensor | None


class PatchPlan(NamedTuple):
    """A checked selection: layers, key/value heads and cache positions (int64, on the CPU)."""

    layers: list[int]
    heads: Int[Tensor, " heads"]
    positions: Int[Tensor, " positions"]


def plan_patch(
    target: KeyValueCache,
    source: KeyValueCache,
    layers: Selection,
    heads: Selection,
    positions: Selection,
) -> PatchPlan:
    """The selection as index tensors; raises (naming what is wrong) unless it fits both caches.

    ``None`` selects every layer, every key/value head, every position the target holds.
    Negative layers count from the end. Positions are cache indices; each must be held by both
    caches (a bounded cache holds positions ``start .. length`` only).
    """
    from kvlens.cache.cache import KeyValueCache

    if not isinstance(source, KeyValueCache):
        raise TypeError(f"source must be a KeyValueCache, got {type(source).__name__}")
    if len(source) != len(target):
        raise ValueError(f"source has {len(source)} layers, this cache {len(target)}")
    if source.batch_size not in (1, target.batch_size):
        raise ValueError(
            f"source has batch size {source.batch_size}; expected this cache's "
            f"({target.batch_size}) or 1 (copied into every row)"
        )
    mine, theirs = target.weights_fingerprint, source.weights_fingerprint
    if mine is not None and theirs is not None and mine != theirs:
        raise ValueError(
            f"source was filled by another model (weights fingerprint {theirs}, this cache's "
            f"{mine}): its keys and values mean nothing here"
        )
    n_layers = len(target)
    chosen_layers = _indices(layers, n_layers, "layer", negative=True).tolist()
    first = target[0]
    chosen_heads = _indices(heads, first.n_kv_heads, "key/value head")
    length = target.check_consistent()
    positions_t = _indices(positions, length, "position")
    for i in chosen_layers:
        mine_e, theirs_e = target[i], source[i]
        if (theirs_e.n_kv_heads, theirs_e.d_head, theirs_e.dtype) != (
            mine_e.n_kv_heads,
            mine_e.d_head,
            mine_e.dtype,
        ):
            raise ValueError(
                f"source's layer {i} stores {theirs_e.n_kv_heads} key/value heads of d_head "
                f"{theirs_e.d_head} in {theirs_e.dtype}, this cache's {mine_e.n_kv_heads} of "
                f"{mine_e.d_head} in {mine_e.dtype}"
            )
        if mine_e.tracks_graph:
            raise ValueError(
                f"this cache's layer {i} keeps an autograd graph; patching its storage would "
                "leave the graph stale (patch a cache filled under torch.no_grad())"
            )
        if positions_t.numel():
            low, high = int(positions_t.min()), int(positions_t.max())
            for name, entry in (("source", theirs_e), ("this cache", mine_e)):
                if low < entry.start or high >= entry.length:
                    raise IndexError(
                        f"position {low if low < entry.start else high} is not held by {name}'s "
                        f"layer {i} (it holds positions {entry.start} to {entry.length - 1})"
                    )
    return PatchPlan(chosen_layers, chosen_heads, positions_t)


def _indices(selection: Selection, size: int, what: str, negative: bool = False) -> Tensor:
    """``selection`` as int64 indices into ``range(size)``; ``None`` is all of them."""
    if selection is None:
        return torch.arange(size)
    if isinstance(selection, bool):
        raise TypeError(f"a {what} must be an int, got a bool")
    if isinstance(selection, int):
        selection = [selection]
    if not isinstance(selection, Tensor) and len(selection) == 0:
        return torch.empty(0, dtype=torch.long)
    out = torch.as_tensor(selection if isinstance(selection, Tensor) else list(selection))
    if out.ndim != 1 or out.is_floating_point() or out.dtype == torch.bool:
        raise TypeError(f"{what}s must be ints or a 1-D integer tensor, got {selection!r}")
    out = out.to(torch.long).cpu()
    if negative:
        out = torch.where(out < 0, out + size, out)
    if out.numel() and (int(out.min()) < 0 or int(out.max()) >= size):
        bad = int(out.min()) if int(out.min()) < 0 else int(out.max())
        raise IndexError(f"{what} {bad} is out of range: this cache has {size} (0 to {size - 1})")
    return out
