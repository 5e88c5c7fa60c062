"""The activations of a whole generation, collected during its own passes.

``generate(..., return_cache=True)`` attaches a :class:`GenerationRecorder`'s hooks for the
duration of the call. Each pass of a generation (the prompt's, then one per decode step; with
``use_past_kv_cache=False`` the whole sequence again) covers the positions
``cache_start .. cache_start + n_new`` (``hook.pass_info``); the recorder keeps the positions it
has not recorded yet, so no pass is run twice and nothing is run again at the end.
:meth:`GenerationRecorder.cache` joins the pieces as one forward pass over the final sequence
would have them:

- ``[batch, pos, ...]`` for position-wise hook points;
- ``[batch, head_index, query_pos, key_pos]`` for attention scores and patterns, the key axis
  covering every position from 0 (what a cache held before the call too), and the keys a pass
  did not read (later positions, or positions a bounded cache dropped, all of them masked in a
  forward pass) filled as a forward pass fills them: ``-inf`` scores, ``0`` pattern.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Int
from torch import Tensor

from kvlens.act_names import is_attention_map
from kvlens.activation_cache import ActivationCache
from kvlens.hook_point import HookPoint
from kvlens.hooks import NameFilter
from kvlens.pass_info import PassInfo

if TYPE_CHECKING:
    from kvlens.model import HookedTransformer


@dataclass
class _Track:
    """One hook point's pieces: ``(activation, key_end)``, ``key_end`` the number of key
    positions up to the piece's last query (attention maps only)."""

    pieces: list[tuple[Tensor, int]] = field(default_factory=list)
    start: int | None = None  # the first position recorded
    covered: int = 0  # positions before this one are recorded
    info: PassInfo | None = None  # the pass of the last piece
    before: int = 0  # ``covered`` before the last piece


class GenerationRecorder:
    """Forward hooks that collect the activations of every pass of one generation.

    Args:
        model: The model that generates.
        names_filter: The hook points to record (as in ``run_with_cache``; ``None``: all).
        device: Where to keep the recorded activations (default: where they are computed).
    """

    def __init__(
        self,
        model: HookedTransformer,
        names_filter: NameFilter = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.model = model
        self.device = device
        points = model.select_hook_points(names_filter)
        self._tracks = {point.name: _Track() for point in points}

    @property
    def fwd_hooks(self) -> list[tuple[str, Any]]:
        """``(name, hook)`` pairs to attach (e.g. with ``model.hooks(fwd_hooks=...)``)."""
        return [(name, self._record) for name in self._tracks]

    def _record(self, tensor: Tensor, *, hook: HookPoint) -> None:
        info = hook.pass_info
        if info is None:
            return  # run outside a forward pass of the model: no position to place it at
        track = self._tracks[hook.name]
        if track.info is info:
            # The same pass again (``ln1`` under split inputs fires once per input): the last
            # value stands, as in run_with_cache.
            track.pieces.pop()
            track.covered = track.before
        map_ = is_attention_map(hook.name)
        seen = tensor.shape[2] if map_ else tensor.shape[1]
        if tensor.ndim < (4 if map_ else 2) or seen != info.n_new:
            raise ValueError(
                f"generate(return_cache=True): hook point {hook.name} saw {tuple(tensor.shape)}"
                f" in a pass of {info.n_new} new positions; its positions cannot be placed"
            )
        if track.start is None:
            track.start = track.covered = info.cache_start
        skip = track.covered - info.cache_start  # positions an earlier pass recorded
        if skip < 0:
            raise ValueError(
                f"generate(return_cache=True): a pass of hook point {hook.name} starts at "
                f"position {info.cache_start}, after the {track.covered} recorded"
            )
        if skip >= info.n_new:
            return
        act = tensor.detach()
        act = act[:, :, skip:] if map_ else act[:, skip:]
        if self.device is not None:
            act = act.to(self.device)
        track.before, track.info = track.covered, info
        track.pieces.append((act, info.cache_start + info.n_new))
        track.covered = info.cache_start + info.n_new

    def cache(self, order: Int[Tensor, "batch pos"] | None = None) -> ActivationCache:
        """The recorded activations as one :class:`ActivationCache`.

        Args:
            order: The permutation the generation applied to the prompt's positions
                (:func:`kvlens.decode.alignment_order`), undone here so that positions are those
                of the prompt as given; ``None`` when it kept them in place.
        """
        store: dict[str, Tensor] = {}
        for name, track in self._tracks.items():
            if not track.pieces:
                continue
            if is_attention_map(name):
                act = _join_maps(track.pieces, track.covered, "scores" in name)
            else:
                act = torch.cat([piece for piece, _ in track.pieces], dim=1)
            if order is not None:
                act = _unpermute(act, order, track.start or 0, is_attention_map(name))
            store[name] = act
        return ActivationCache(store, self.model, has_batch_dim=True)


def _join_maps(pieces: list[tuple[Tensor, int]], width: int, scores: bool) -> Tensor:
    """Attention maps of consecutive passes as one ``[batch, head, query, width]`` tensor."""
    rows = []
    for piece, key_end in pieces:
        n_keys = piece.shape[-1]
        full = piece.new_full((*piece.shape[:-1], width), float("-inf") if scores else 0.0)
        full[..., key_end - n_keys : key_end] = piece
        rows.append(full)
    return torch.cat(rows, dim=2)


def _unpermute(act: Tensor, order: Tensor, start: int, map_: bool) -> Tensor:
    """``act`` with its first ``order.shape[1]`` recorded positions put back in the prompt's
    order (``order[:, j]`` is the prompt position that ran at aligned position ``j``)."""
    n = order.shape[1]
    inverse = order.argsort(dim=1).to(act.device)
    act = act.clone()
    if not map_:
        index = inverse.view(*inverse.shape, *([1] * (act.ndim - 2))).expand_as(act[:, :n])
        act[:, :n] = act[:, :n].gather(1, index)
        return act
    batch, heads, queries, keys = act.shape
    rows = inverse[:, None, :, None].expand(batch, heads, n, keys)
    act[:, :, :n] = act[:, :, :n].gather(2, rows)
    columns = (inverse + start)[:, None, None, :].expand(batch, heads, queries, n)
    act[..., start : start + n] = act.gather(3, columns)
    return act
