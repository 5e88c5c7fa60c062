"""The hook point: an identity module that kvlens hooks and torch's module hooks can observe.

TransformerLens 2.18's ``HookPoint`` semantics (forward and backward hooks, permanent hooks,
context levels, ``ctx``), implemented without torch hooks: kvlens hooks are kept in plain lists
and run by :meth:`HookPoint.forward`, so a hook point with nothing attached costs one check on
the decode hot path.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, ParamSpec, Protocol, TypeVar

import torch
from torch import Tensor, nn
from torch.nn.modules import module as torch_module

from kvlens.pass_info import PassInfo
from kvlens.structure import WatchedModule

Direction = Literal["fwd", "bwd"]
DIRECTIONS = ("fwd", "bwd", "both")

# torch's global module hooks: they fire on every module, hook points included.
_G_FWD_PRE = torch_module._global_forward_pre_hooks
_G_FWD = torch_module._global_forward_hooks
_G_BWD_PRE = torch_module._global_backward_pre_hooks
_G_BWD = torch_module._global_backward_hooks


class HookFn(Protocol):
    """A hook: receives the activation (or its gradient) and its hook point.

    Returns a replacement of the same shape, or ``None`` to leave it.
    """

    def __call__(self, tensor: Tensor, *, hook: HookPoint) -> Tensor | None: ...


@dataclass(frozen=True)
class HookEntry:
    """A hook attached to a hook point (TransformerLens's ``LensHandle``, without torch's handle).

    Attributes:
        hook: The function.
        is_permanent: Survives resets unless ``including_permanent`` is asked.
        context_level: The ``hooks()`` block that added it, or ``None``.
    """

    hook: Callable[..., Any]
    is_permanent: bool = False
    context_level: int | None = None


P = ParamSpec("P")
R = TypeVar("R")


def _marks_observed(register: Callable[P, R]) -> Callable[P, R]:
    """Wrap a torch ``register_*hook`` method: the hook point then takes nn.Module's call path.

    torch's handles remove hooks without telling the module, so the mark is cleared lazily (see
    :meth:`HookPoint.is_observed`).
    """

    @functools.wraps(register)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        handle = register(*args, **kwargs)
        point: Any = args[0]
        point._observed = True
        return handle

    return wrapper


def global_hooks() -> bool:
    """Whether torch's global module hooks (which fire on every module) are registered.

    The one place kvlens reads torch's global hook registry.
    """
    return bool(_G_FWD_PRE or _G_FWD or _G_BWD_PRE or _G_BWD)


def _checked(out: Any, like: Tensor, what: str) -> Tensor:
    """``out`` if it can replace ``like``; ``what`` names the hook in the error."""
    if not isinstance(out, Tensor):
        raise TypeError(f"{what} returned {type(out).__name__}; return a Tensor or None")
    if out.shape != like.shape:
        raise ValueError(f"{what} returned shape {tuple(out.shape)}, expected {tuple(like.shape)}")
    return out


class HookPoint(WatchedModule):
    """An identity module marking an activation that hooks can read or replace.

    Its ``name`` is its module path in the model (``blocks.3.attn.hook_pattern``). Calling it with
    no hook attached returns the input after one check, so hook points can sit on the hot path.
    Forward hooks run in order, each seeing the last one's output. Backward hooks each receive
    the gradient of the hook point's output (after the forward hooks); the last one that returns
    a tensor replaces the gradient flowing back. As in TransformerLens, the backward hooks that
    fire are those attached when the forward ran. torch's own module hooks registered on a hook
    point (and torch's global module hooks) fire too.

    Attributes:
        name: The module path, set by :meth:`HookedRootModule.setup`.
        fwd_hooks: The attached forward hooks, in running order.
        bwd_hooks: The attached backward hooks, in running order.
        ctx: A dict hooks may use to keep state between calls.
    """

    def __init__(self) -> None:
        super().__init__()
        self.name: str = ""
        # Both lists are replaced, never mutated, so a forward iterating one is never disturbed.
        self.fwd_hooks: list[HookEntry] = []
        self.bwd_hooks: list[HookEntry] = []
        self.ctx: dict[Any, Any] = {}
        self._observed = False  # a kvlens hook is attached, or a torch hook may be
        self._root: weakref.ref[Any] | None = None  # the model, for pass_info (bind_root)

    register_forward_pre_hook = _marks_observed(nn.Module.register_forward_pre_hook)
    register_forward_hook = _marks_observed(nn.Module.register_forward_hook)
    register_full_backward_pre_hook = _marks_observed(nn.Module.register_full_backward_pre_hook)
    register_full_backward_hook = _marks_observed(nn.Module.register_full_backward_hook)
    register_backward_hook = _marks_observed(nn.Module.register_backward_hook)

    def _torch_hooks(self) -> bool:
        return bool(
            self._forward_pre_hooks
            or self._forward_hooks
            or self._backward_pre_hooks
            or self._backward_hooks
        )

    @property
    def is_observed(self) -> bool:
        """Whether any hook would see this point.

        That is a kvlens forward or backward hook, a torch module hook on this point, or one of
        torch's global module hooks. The block's fused native layer and the components' fast
        paths run only where none of their hook points is observed.
        """
        if self._observed and not (self.fwd_hooks or self.bwd_hooks or self._torch_hooks()):
            self._observed = False  # the torch hooks that marked it are gone
        return self._observed or global_hooks()

    def bind_root(self, root: Any) -> None:
        """Remember the model this point belongs to (weakly), for :attr:`pass_info`."""
        self._root = weakref.ref(root)

    @property
    def pass_info(self) -> PassInfo | None:
        """The running forward pass's positions and generation step, for a hook to read.

        For example ``hook.pass_info.positions`` (``[batch, pos]``) says which positions the
        activation covers, also in a decode step, and ``hook.pass_info.step`` which step of
        ``generate`` runs (:class:`~kvlens.pass_info.PassInfo`). ``None`` outside a forward pass
        of the model the point belongs to.
        """
        root = self._root() if self._root is not None else None
        return None if root is None else root.pass_info

    @property
    def attached(self) -> bool:
        """Whether a kvlens hook or a torch module hook is attached to this very point (torch's
        global module hooks aside)."""
        return bool(self.fwd_hooks or self.bwd_hooks or self._torch_hooks())

    @property
    def has_hooks(self) -> bool:
        """Same as :attr:`is_observed` (components use it to choose their step-by-step path)."""
        return self.is_observed

    def add_hook(
        self,
        hook: Callable[..., Any],
        dir: Direction = "fwd",
        is_permanent: bool = False,
        level: int | None = None,
        prepend: bool = False,
    ) -> None:
        """Attach ``hook(tensor, hook=self)``.

        Args:
            hook: Returns a replacement of the same shape, or ``None``.
            dir: ``"fwd"`` to see the activation, ``"bwd"`` to see its gradient.
            is_permanent: Survive :meth:`remove_hooks` unless ``including_permanent``.
            level: The context level it belongs to (``hooks()`` sets it).
            prepend: Run before the hooks already attached.
        """
        if dir not in ("fwd", "bwd"):
            raise ValueError(f"dir must be 'fwd' or 'bwd', got {dir!r}")
        if not callable(hook):
            raise TypeError(f"hook for {self.name!r} must be callable, got {type(hook).__name__}")
        entry = HookEntry(hook, is_permanent, level)
        hooks = self.fwd_hooks if dir == "fwd" else self.bwd_hooks
        hooks = [entry, *hooks] if prepend else [*hooks, entry]
        if dir == "fwd":
            self.fwd_hooks = hooks
        else:
            self.bwd_hooks = hooks
        self._observed = True

    def add_perma_hook(self, hook: Callable[..., Any], dir: Direction = "fwd") -> None:
        """Attach a permanent hook (see :meth:`add_hook`)."""
        self.add_hook(hook, dir=dir, is_permanent=True)

    def remove_hooks(
        self,
        dir: Direction | Literal["both"] = "fwd",
        including_permanent: bool = False,
        level: int | None = None,
    ) -> None:
        """Detach hooks in direction ``dir`` (``"fwd"``, ``"bwd"`` or ``"both"``).

        With ``including_permanent`` every hook goes, whatever its level. Otherwise the temporary
        ones go: all of them if ``level`` is ``None``, else those added at that context level.
        """
        if dir not in DIRECTIONS:
            raise ValueError(f"dir must be one of {DIRECTIONS}, got {dir!r}")

        def kept(hooks: list[HookEntry]) -> list[HookEntry]:
            if including_permanent:
                return []
            return [
                h
                for h in hooks
                if h.is_permanent or (level is not None and h.context_level != level)
            ]

        if dir in ("fwd", "both"):
            self.fwd_hooks = kept(self.fwd_hooks)
        if dir in ("bwd", "both"):
            self.bwd_hooks = kept(self.bwd_hooks)
        self._observed = bool(self.fwd_hooks or self.bwd_hooks or self._torch_hooks())

    def clear_context(self) -> None:
        """Empty :attr:`ctx`."""
        self.ctx = {}

    def layer(self) -> int:
        """The layer index in this hook point's name (``blocks.3.attn.hook_q`` is in layer 3)."""
        parts = self.name.split(".")
        if len(parts) < 2 or not parts[1].isdigit():
            raise ValueError(
                f"hook point {self.name!r} is not in a layer; layer() needs a name like "
                "'blocks.<layer>.<...>'"
            )
        return int(parts[1])

    def __call__(self, x: Tensor) -> Tensor:  # type: ignore[override]
        if not (self._observed or _G_FWD_PRE or _G_FWD or _G_BWD_PRE or _G_BWD):
            return x
        if self._torch_hooks() or global_hooks():
            return super().__call__(x)  # type: ignore[no-any-return]
        if not (self.fwd_hooks or self.bwd_hooks):
            self._observed = False  # the torch hooks that marked it are gone
        return self.forward(x)

    def forward(self, x: Tensor) -> Tensor:
        """Run the forward hooks on ``x``, and set up the backward hooks on the result."""
        for entry in self.fwd_hooks:
            out = entry.hook(x, hook=self)
            if out is not None:
                x = _checked(out, x, f"forward hook on {self.name!r}")
        bwd_hooks = self.bwd_hooks
        if bwd_hooks and x.requires_grad and torch.is_grad_enabled():
            x = x.view_as(x)  # a node of our own, so the hook sees only this point's gradient
            x.register_hook(functools.partial(self._run_bwd_hooks, bwd_hooks))
        return x

    def _run_bwd_hooks(self, hooks: list[HookEntry], grad: Tensor) -> Tensor | None:
        new_grad = None
        for entry in hooks:
            out = entry.hook(grad, hook=self)
            if isinstance(out, tuple) and len(out) == 1:
                out = out[0]  # TransformerLens accepts a 1-tuple, as torch's module hooks return
            if out is not None:
                new_grad = _checked(out, grad, f"backward hook on {self.name!r}")
        return new_grad

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, fwd_hooks={len(self.fwd_hooks)}, bwd_hooks={len(self.bwd_hooks)}"
        )
