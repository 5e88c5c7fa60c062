"""Running a model with hooks or with an activation cache, as TransformerLens 2.18 does.

:class:`HookedRootModule` finds hook points by name, attaches hooks at context levels so that
nested ``hooks()`` blocks detach only their own, and records activations and gradients for
``run_with_cache`` (with ``incl_bwd``, ``remove_batch_dim`` and ``pos_slice``).

Hooks are state of the model object, as in TransformerLens: every thread that runs a model runs
the hooks attached to it, whichever thread attached them. To hook independently, give each thread
its own model (``copy.deepcopy(model)``, made outside any ``hooks()`` block).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, overload

import torch
from torch import Tensor, nn

from kvlens.act_names import PosSlice, get_act_name, position_index, slice_positions
from kvlens.activation_cache import ActivationCache
from kvlens.hook_point import Direction, HookEntry, HookFn, HookPoint
from kvlens.pass_info import PassInfo

__all__ = [
    "ActivationCache",
    "HookEntry",
    "HookFn",
    "HookPoint",
    "HookedRootModule",
    "NameFilter",
    "get_act_name",
]

logger = logging.getLogger(__name__)

NameFilter = str | Callable[[str], bool] | Sequence[str] | None

_FORWARD_KEYWORDS: dict[type[nn.Module], frozenset[str] | None] = {}


def _forward_keywords(cls: type[nn.Module]) -> frozenset[str] | None:
    """Keyword arguments ``cls.forward`` accepts (``None``: any), read once per class."""
    if cls not in _FORWARD_KEYWORDS:
        params = list(inspect.signature(cls.forward).parameters.values())[1:]  # drop self
        keywords = (p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        variadic = any(p.kind is p.VAR_KEYWORD for p in params)
        _FORWARD_KEYWORDS[cls] = None if variadic else frozenset(keywords)
    return _FORWARD_KEYWORDS[cls]


HookList = Sequence[tuple[NameFilter, Callable[..., Any]]]


class HookedRootModule(nn.Module):
    """Base of models with hook points: finds them by name and runs with hooks or a cache.

    Subclasses build their modules, then call :meth:`setup` once to name every hook point.

    Hooks belong to the model object, not to a thread or a call: while a :meth:`hooks` block
    (or ``run_with_hooks``, ``run_with_cache``, ``add_hook``) has hooks attached, every forward
    pass of this model, in any thread, runs them, and a generation in another thread produces
    different text. Use one model per thread, or ``copy.deepcopy(model)`` (a copy carries the
    hooks attached when it is made, so make it outside any ``hooks()`` block), to hook
    independently. A ``hooks()`` block detaches the hooks of its own level when it closes, even
    when another thread's block closed first; but levels are depths of one counter per model,
    so a block opened while another thread's is still open after a third closed may share its
    level, and then the first of the two to close detaches both blocks' hooks.

    Attributes:
        hook_dict: Every hook point by name.
        context_level: How many :meth:`hooks` blocks are open.
    """

    hook_dict: dict[str, HookPoint]
    context_level: int = 0

    def setup(self) -> None:
        """Name every :class:`HookPoint` by its module path and index them."""
        self.hook_dict = {}
        self.context_level = 0
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.name = name
                module.bind_root(self)
                self.hook_dict[name] = module

    @property
    def pass_info(self) -> PassInfo | None:
        """The running forward pass's positions and generation step (``None`` between passes).

        Hooks read it as ``hook.pass_info`` (see :class:`~kvlens.pass_info.PassInfo`).
        """
        return getattr(self, "_pass_info", None)

    def set_pass_info(self, info: PassInfo | None) -> PassInfo | None:
        """Record the running pass's :class:`PassInfo` (the model's forward does); returns the
        one it replaces, to be put back when the pass ends."""
        before = self.pass_info
        self._pass_info = info
        return before

    @property
    def generation_step(self) -> int | None:
        """The step ``generate`` is at (it sets it; ``None`` outside ``generate``)."""
        return getattr(self, "_generation_step", None)

    def set_generation_step(self, step: int | None) -> None:
        """Set by ``generate``: 0 for the prompt's pass, ``k`` for the ``k``-th token fed back."""
        self._generation_step = step

    def hook_points(self) -> list[HookPoint]:
        """Every hook point, in module order."""
        return list(self.hook_dict.values())

    def select_hook_points(self, name_or_filter: NameFilter) -> list[HookPoint]:
        """The hook points a name, a list of names or a predicate selects (each once; ``None``:
        all). An unknown name raises ``ValueError`` with the closest names."""
        if name_or_filter is None:
            return self.hook_points()
        if isinstance(name_or_filter, str):
            if name_or_filter not in self.hook_dict:
                close = difflib.get_close_matches(name_or_filter, list(self.hook_dict), n=3)
                hint = f"; did you mean {close}?" if close else ""
                raise ValueError(f"unknown hook point {name_or_filter!r}{hint}")
            return [self.hook_dict[name_or_filter]]
        if callable(name_or_filter):
            return [hp for name, hp in self.hook_dict.items() if name_or_filter(name)]
        if isinstance(name_or_filter, Sequence):
            points = {id(hp): hp for n in name_or_filter for hp in self.select_hook_points(n)}
            return list(points.values())
        raise TypeError(
            "a hook name must be a str, a list of str or a callable filter, "
            f"got {type(name_or_filter).__name__}"
        )

    def add_hook(
        self,
        name: NameFilter,
        hook: Callable[..., Any],
        dir: Direction = "fwd",
        is_permanent: bool = False,
        level: int | None = None,
        prepend: bool = False,
    ) -> None:
        """Attach ``hook(tensor, hook=hook_point)`` to the hook points ``name`` selects.

        Args:
            name: A hook name, a list of names, or a predicate on names.
            hook: Returns a replacement tensor of the same shape, or ``None`` to leave it.
            dir: ``"fwd"`` (sees the activation) or ``"bwd"`` (sees its gradient).
            is_permanent: Survives :meth:`reset_hooks` unless ``including_permanent``.
            level: The context level it belongs to.
            prepend: Run before the hooks already attached.
        """
        for point in self.select_hook_points(name):
            point.add_hook(hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend)

    def add_perma_hook(
        self, name: NameFilter, hook: Callable[..., Any], dir: Direction = "fwd"
    ) -> None:
        """Attach a permanent hook (see :meth:`add_hook`)."""
        self.add_hook(name, hook, dir=dir, is_permanent=True)

    def remove_all_hook_fns(
        self,
        direction: Direction | Literal["both"] = "both",
        including_permanent: bool = False,
        level: int | None = None,
    ) -> None:
        """:meth:`HookPoint.remove_hooks` on every hook point."""
        for point in self.hook_dict.values():
            point.remove_hooks(direction, including_permanent=including_permanent, level=level)

    def clear_contexts(self) -> None:
        """Empty every hook point's ``ctx``."""
        for point in self.hook_dict.values():
            point.clear_context()

    def reset_hooks(
        self,
        clear_contexts: bool = True,
        direction: Direction | Literal["both"] = "both",
        including_permanent: bool = False,
        level: int | None = None,
    ) -> None:
        """Detach temporary hooks (of one context level if ``level`` is given).

        Args:
            clear_contexts: Also empty every hook point's ``ctx``.
            direction: ``"fwd"``, ``"bwd"`` or ``"both"``.
            including_permanent: Detach permanent hooks too, at every level.
            level: Only the hooks added at this context level.
        """
        if clear_contexts:
            self.clear_contexts()
        self.remove_all_hook_fns(direction, including_permanent, level=level)

    @contextlib.contextmanager
    def hooks(
        self,
        fwd_hooks: HookList = (),
        bwd_hooks: HookList = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
    ) -> Iterator[HookedRootModule]:
        """Context manager: attach hooks at a new context level, detach that level's on exit.

        Hooks attached inside the block by other means (``add_hook``, a nested block that keeps
        its hooks) are not this level's and stay.

        The hooks are attached to the model, not to the calling thread: while the block is open,
        every thread's runs of this model (forward passes, ``generate``, chat) run them. Open
        blocks on a model of each thread's own (``copy.deepcopy(model)``, made outside the block)
        to hook independently; blocks opened by several threads on one model must still close
        in the reverse order of opening, as nested blocks do.

        Args:
            fwd_hooks: Pairs ``(name or filter, hook)`` for the forward pass.
            bwd_hooks: The same for the backward pass.
            reset_hooks_end: Detach this block's hooks on exit (default).
            clear_contexts: Also empty every hook point's ``ctx`` on exit.
        """
        self.context_level += 1
        level = self.context_level  # this block's, even if another thread's block closes first
        try:
            for name, hook in fwd_hooks:
                self.add_hook(name, hook, dir="fwd", level=level)
            for name, hook in bwd_hooks:
                self.add_hook(name, hook, dir="bwd", level=level)
            yield self
        finally:
            if reset_hooks_end:
                self.reset_hooks(clear_contexts, level=level)
            self.context_level -= 1

    def _check_forward_kwargs(
        self, method: str, kwargs: dict[str, Any], own: Sequence[str]
    ) -> None:
        """Raise for a keyword argument ``forward`` does not take, before anything runs."""
        accepted = _forward_keywords(type(self))
        if accepted is None:
            return
        for key in kwargs:
            if key not in accepted:
                close = difflib.get_close_matches(key, [*accepted, *own], n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise TypeError(f"{method}() got an unexpected keyword argument {key!r}{hint}")

    def run_with_hooks(
        self,
        *model_args: Any,
        fwd_hooks: HookList = (),
        bwd_hooks: HookList = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        **model_kwargs: Any,
    ) -> Any:
        """Run the model with hooks attached (see :meth:`hooks`), then detach them.

        Backward hooks attached here fire on a backward pass through this run's output even
        after they are detached (as in TransformerLens), but on no later run.

        Args:
            fwd_hooks: Pairs ``(name or filter, hook)`` for the forward pass.
            bwd_hooks: The same for the backward pass.
            reset_hooks_end: Detach the hooks afterwards (default).
            clear_contexts: Also empty every hook point's ``ctx`` afterwards.
            *model_args, **model_kwargs: Passed to ``forward``.
        """
        own = ("fwd_hooks", "bwd_hooks", "reset_hooks_end", "clear_contexts")
        self._check_forward_kwargs("run_with_hooks", model_kwargs, own)
        if bwd_hooks and reset_hooks_end:
            logger.warning(
                "run_with_hooks: reset_hooks_end=True detaches the backward hooks when it returns;"
                " they fire on a backward pass through this output but on no later run"
            )
        with self.hooks(fwd_hooks, bwd_hooks, reset_hooks_end, clear_contexts):
            return self(*model_args, **model_kwargs)

    def get_caching_hooks(
        self,
        names_filter: NameFilter = None,
        incl_bwd: bool = False,
        device: torch.device | str | None = None,
        remove_batch_dim: bool = False,
        cache: dict[str, Tensor] | None = None,
        pos_slice: PosSlice = None,
    ) -> tuple[dict[str, Tensor], HookList, HookList]:
        """Hooks that record activations (and gradients, as ``name + "_grad"``) into a dict.

        Arguments as in :meth:`run_with_cache`; ``cache`` is the dict to fill (default a new
        one). Returns the dict, the forward hooks and the backward hooks (empty unless
        ``incl_bwd``); nothing is attached.
        """
        store: dict[str, Tensor] = {} if cache is None else cache
        index = position_index(pos_slice)

        def save(tensor: Tensor, *, hook: HookPoint, suffix: str = "") -> None:
            act = tensor.detach().to(device)
            if remove_batch_dim:
                act = act[0]
            if index is not None:
                act = slice_positions(act, hook.name, index, tensor.ndim)
            store[hook.name + suffix] = act

        points = self.select_hook_points(names_filter)
        fwd = [(p.name, save) for p in points]
        save_grad = functools.partial(save, suffix="_grad")
        bwd = [(p.name, save_grad) for p in points] if incl_bwd else []
        return store, fwd, bwd

    @overload
    def run_with_cache(
        self, *model_args: Any, return_cache_object: Literal[True] = ..., **kwargs: Any
    ) -> tuple[Any, ActivationCache]: ...

    @overload
    def run_with_cache(
        self, *model_args: Any, return_cache_object: Literal[False], **kwargs: Any
    ) -> tuple[Any, dict[str, Tensor]]: ...

    def run_with_cache(
        self,
        *model_args: Any,
        names_filter: NameFilter = None,
        device: torch.device | str | None = None,
        remove_batch_dim: bool = False,
        incl_bwd: bool = False,
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        pos_slice: PosSlice = None,
        return_cache_object: bool = True,
        **model_kwargs: Any,
    ) -> tuple[Any, ActivationCache | dict[str, Tensor]]:
        """Run the model and record activations.

        Args:
            names_filter: Which hook points to record: a name, a list of names, a predicate, or
                ``None`` for all. A name that is not a hook point raises ``ValueError``.
            device: Move recorded activations there (default: leave them where they are).
            remove_batch_dim: Record row 0 only, without the batch axis.
            incl_bwd: Call ``backward()`` on the output (which must be a scalar, e.g.
                ``return_type="loss"``) and record gradients as ``name + "_grad"``.
            reset_hooks_end: Detach the recording hooks afterwards (default).
            clear_contexts: Also empty every hook point's ``ctx`` afterwards.
            pos_slice: Record these positions only: an int, a ``(start, stop[, step])`` tuple,
                a slice, or a list or tensor of positions. The position axis is -3 for
                ``[..., pos, head, d_head]`` hook points and -2 otherwise (the query position for
                scores and pattern).
            return_cache_object: Return an :class:`ActivationCache` (default) or a plain dict.
            *model_args, **model_kwargs: Passed to ``forward``.

        Returns:
            The model's output and the recorded activations keyed by hook name.
        """
        own = (
            "names_filter", "device", "remove_batch_dim", "incl_bwd", "reset_hooks_end",
            "clear_contexts", "pos_slice", "return_cache_object",
        )  # fmt: skip
        self._check_forward_kwargs("run_with_cache", model_kwargs, own)
        store, fwd, bwd = self.get_caching_hooks(
            names_filter, incl_bwd, device, remove_batch_dim, pos_slice=pos_slice
        )
        with self.hooks(fwd, bwd, reset_hooks_end, clear_contexts):
            out = self(*model_args, **model_kwargs)
            if incl_bwd:
                if not isinstance(out, Tensor) or out.numel() != 1:
                    shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                    raise ValueError(
                        "run_with_cache(incl_bwd=True) calls backward() on the model's output, "
                        f"which must be a scalar (e.g. return_type='loss'); got {shape}"
                    )
                out.backward()
        if return_cache_object:
            return out, ActivationCache(store, self, has_batch_dim=not remove_batch_dim)
        return out, store
