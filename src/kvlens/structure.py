"""A counter of structural changes to kvlens's modules, so plans built from them know when to go.

A block's decode plan (:mod:`kvlens.components.decode_plan`) is built once from what its parts
say about themselves and reused every token. It stays right as long as nothing it was built from
changes: no hook is added or removed, no submodule, parameter or attribute is replaced. Every
such change bumps :func:`generation`:

- setting a public attribute (``block.mlp = ...``, ``attn.W_QKV = nn.Parameter(...)``,
  ``mlp.act = fn``, ``ln1.eps = ...``) or deleting one, on a :class:`WatchedModule`;
- adding or removing a torch module hook on one (``register_forward_hook`` and its handle's
  ``remove()``): their hook dicts are :class:`WatchedHooks`;
- adding or removing a kvlens hook (:class:`~kvlens.hook_point.HookPoint` calls :func:`changed`).

A plan records the generation it was built at and is rebuilt, lazily, when it differs. torch's
global module hooks, which apply to every module, are checked by the plan's user on each call
(:func:`kvlens.hook_point.global_hooks`).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from torch import nn

_generation = 0


def generation() -> int:
    """The number of structural changes so far (any module, any model)."""
    return _generation


def changed() -> None:
    """Count a structural change: every plan built before it is rebuilt before its next use."""
    global _generation
    _generation += 1


class WatchedHooks(OrderedDict[Any, Any]):
    """A module's hook dict that counts its insertions and removals as structural changes."""

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        changed()

    def __delitem__(self, key: Any) -> None:
        super().__delitem__(key)
        changed()

    def clear(self) -> None:
        super().clear()
        changed()

    def pop(self, key: Any, *default: Any) -> Any:
        changed()
        return super().pop(key, *default)

    def popitem(self, last: bool = True) -> Any:
        changed()
        return super().popitem(last)


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


class WatchedModule(nn.Module):
    """An ``nn.Module`` whose public attribute changes and torch hooks count as structural changes.

    Private attributes (a leading ``_``) are the module's own bookkeeping and do not count.
    """

    def __init__(self) -> None:
        super().__init__()
        for name in _HOOK_DICTS:
            object.__setattr__(self, name, WatchedHooks(getattr(self, name)))

    @property
    def has_torch_forward_hooks(self) -> bool:
        """Whether a torch forward or forward-pre hook is registered on this very module."""
        return bool(self._forward_hooks or self._forward_pre_hooks)

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if not name.startswith("_"):
            changed()

    def __delattr__(self, name: str) -> None:
        super().__delattr__(name)
        if not name.startswith("_"):
            changed()
