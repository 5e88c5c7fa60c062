"""Where the tokens of the running forward pass sit, for hooks to read (``hook.pass_info``).

During every forward pass the model records a :class:`PassInfo`: the new tokens' positions
(``[batch, pos]``, what the positional embedding or rotary uses; padding consumes none), the
cache index of the first new token, and the generation step when ``generate`` runs the pass
(0 for the prompt, ``k`` for the pass that feeds back the ``k``-th generated token). A hook
reads it as ``hook.pass_info``, so it can tell a prompt position from a generated one in a
decode step, where it sees ``[batch, 1, ...]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor


@dataclass(frozen=True)
class PassInfo:
    """The running pass's tokens.

    Attributes:
        row_positions: The new tokens' positions, ``[1, pos]`` when every row has the same
            (no padding), else ``[batch, pos]``; :attr:`positions` is always ``[batch, pos]``:
            each new token's position in its row (a padded row's real tokens count from 0; over
            a shared prefix, after the prefix's real tokens).
        batch: The rows of the pass.
        cache_start: The cache index of the first new token (the tokens already in the cache,
            a shared prefix's included; padding slots count). 0 without a cache.
        n_new: The new tokens of each row.
        step: The generation step: 0 for the prompt's pass, ``k`` for the pass that feeds back
            the ``k``-th generated token (with ``use_past_kv_cache=False`` that pass reruns the
            whole sequence); ``None`` outside ``generate``.
    """

    row_positions: Int[Tensor, "batch_or_1 pos"]
    batch: int
    cache_start: int
    n_new: int
    step: int | None = None

    @property
    def positions(self) -> Int[Tensor, "batch pos"]:
        """Each row's new tokens' positions (expanded when read, not on every pass)."""
        return self.row_positions.expand(self.batch, -1)

    @property
    def cache_indices(self) -> Int[Tensor, " pos"]:
        """The new tokens' cache indices, ``cache_start .. cache_start + n_new``."""
        device = self.row_positions.device
        return torch.arange(self.cache_start, self.cache_start + self.n_new, device=device)
