"""Named hook points and the machinery to run a model with hooks or with an activation cache."""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn


class HookFn(Protocol):
    """A hook: receives the activation and its hook point; returns a replacement or ``None``."""

    def __call__(self, tensor: Tensor, *, hook: HookPoint) -> Tensor | None: ...


NameFilter = str | Callable[[str], bool] | Sequence[str] | None


class HookPoint(nn.Module):
    """An identity module marking an activation that hooks can read or replace.

    Its ``name`` is its module path in the model (``blocks.3.attn.hook_pattern``). Calling it with
    no hook attached returns the input at the cost of one attribute check, so hook points can sit
    on the hot path.
    """

    def __init__(self) -> None:
        super().__init__()
        self.name: str = ""
        self._fns: list[tuple[Callable[..., Any], bool]] = []

    @property
    def has_hooks(self) -> bool:
        """Whether any hook is attached (the attention uses it to choose its eager path)."""
        return bool(self._fns) or bool(self._forward_hooks)

    def add_hook(
        self, fn: Callable[..., Any], is_permanent: bool = False, prepend: bool = False
    ) -> None:
        """Attach ``fn(tensor, hook=self)``; hooks run in order, each sees the last output."""
        if not callable(fn):
            raise TypeError(f"hook for {self.name!r} must be callable, got {type(fn).__name__}")
        if prepend:
            self._fns.insert(0, (fn, is_permanent))
        else:
            self._fns.append((fn, is_permanent))

    def remove_hooks(self, including_permanent: bool = False) -> None:
        """Detach temporary hooks (and permanent ones when asked)."""
        self._fns = [(fn, perm) for fn, perm in self._fns if perm and not including_permanent]

    def __call__(self, x: Tensor) -> Tensor:  # type: ignore[override]
        if not self._fns:
            return super().__call__(x) if self._forward_hooks else x
        for fn, _ in self._fns:
            out = fn(x, hook=self)
            if out is not None:
                if not isinstance(out, Tensor):
                    raise TypeError(
                        f"hook on {self.name!r} returned {type(out).__name__}; "
                        "return a Tensor or None"
                    )
                if out.shape != x.shape:
                    raise ValueError(
                        f"hook on {self.name!r} returned shape {tuple(out.shape)}, "
                        f"the activation has shape {tuple(x.shape)}"
                    )
                x = out
        return super().__call__(x) if self._forward_hooks else x

    def forward(self, x: Tensor) -> Tensor:
        return x

    def extra_repr(self) -> str:
        return f"name={self.name!r}, hooks={len(self._fns)}"


class ActivationCache:
    """Activations recorded by ``run_with_cache``, keyed by hook name.

    Behaves like a read-only dict. Keys may also be given TransformerLens's short way:
    ``cache["pattern", 3]`` is ``cache["blocks.3.attn.hook_pattern"]``.
    """

    def __init__(self, activations: dict[str, Tensor], model: nn.Module | None = None) -> None:
        self._acts = activations
        self.model = model

    def __getitem__(self, key: str | tuple[Any, ...]) -> Tensor:
        name = get_act_name(*key) if isinstance(key, tuple) else key
        try:
            return self._acts[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self._acts), n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise KeyError(f"no activation named {name!r} in this cache{hint}") from None

    def __contains__(self, key: object) -> bool:
        return key in self._acts

    def __iter__(self) -> Iterator[str]:
        return iter(self._acts)

    def __len__(self) -> int:
        return len(self._acts)

    def keys(self) -> Any:
        return self._acts.keys()

    def values(self) -> Any:
        return self._acts.values()

    def items(self) -> Any:
        return self._acts.items()

    def to(self, device: torch.device | str) -> ActivationCache:
        """A copy with every activation on ``device``."""
        return ActivationCache({k: v.to(device) for k, v in self._acts.items()}, self.model)

    def __repr__(self) -> str:
        return f"ActivationCache({len(self._acts)} activations)"


_SHORT_NAMES = {
    "embed": "hook_embed",
    "pos_embed": "hook_pos_embed",
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "q": "attn.hook_q",
    "k": "attn.hook_k",
    "v": "attn.hook_v",
    "rot_q": "attn.hook_rot_q",
    "rot_k": "attn.hook_rot_k",
    "z": "attn.hook_z",
    "attn_scores": "attn.hook_attn_scores",
    "pattern": "attn.hook_pattern",
    "pre": "mlp.hook_pre",
    "post": "mlp.hook_post",
    "normalized": "hook_normalized",
}


def get_act_name(name: str, layer: int | None = None, layer_type: str | None = None) -> str:
    """Full hook name from TransformerLens's short form: ``get_act_name("pattern", 3)``.

    ``layer_type`` picks the norm for ``"normalized"`` (``"ln1"``, ``"ln2"``); with no layer,
    ``"normalized"`` means ``ln_final.hook_normalized``.
    """
    if "." in name or name.startswith("hook_"):
        return name
    if name not in _SHORT_NAMES:
        raise KeyError(f"unknown short activation name {name!r}; known: {sorted(_SHORT_NAMES)}")
    suffix = _SHORT_NAMES[name]
    if name == "normalized":
        if layer is None:
            return "ln_final.hook_normalized"
        return f"blocks.{layer}.{layer_type or 'ln1'}.hook_normalized"
    if name in ("embed", "pos_embed"):
        return suffix
    if layer is None:
        raise KeyError(f"activation {name!r} needs a layer index")
    return f"blocks.{layer}.{suffix}"


class HookedRootModule(nn.Module):
    """Base of models with hook points: finds them by name and runs with hooks or a cache.

    Subclasses build their modules, then call :meth:`setup` once to name every hook point.
    """

    hook_dict: dict[str, HookPoint]

    def setup(self) -> None:
        """Name every :class:`HookPoint` by its module path and index them."""
        self.hook_dict = {}
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.name = name
                self.hook_dict[name] = module

    def _resolve(self, name_or_filter: NameFilter) -> list[HookPoint]:
        if name_or_filter is None:
            return list(self.hook_dict.values())
        if isinstance(name_or_filter, str):
            if name_or_filter not in self.hook_dict:
                close = difflib.get_close_matches(name_or_filter, list(self.hook_dict), n=3)
                hint = f"; did you mean {close}?" if close else ""
                raise ValueError(f"unknown hook point {name_or_filter!r}{hint}")
            return [self.hook_dict[name_or_filter]]
        if callable(name_or_filter):
            return [hp for name, hp in self.hook_dict.items() if name_or_filter(name)]
        if isinstance(name_or_filter, Sequence):
            return [hp for n in name_or_filter for hp in self._resolve(n)]
        raise TypeError(
            "a hook name must be a str, a list of str or a callable filter, "
            f"got {type(name_or_filter).__name__}"
        )

    def add_hook(
        self,
        name: NameFilter,
        hook: Callable[..., Any],
        dir: str = "fwd",
        is_permanent: bool = False,
        prepend: bool = False,
    ) -> None:
        """Attach ``hook(tensor, hook=hook_point)`` to the hook points ``name`` selects.

        Args:
            name: A hook name, a list of names, or a predicate on names.
            hook: Returns a replacement tensor of the same shape, or ``None`` to leave it.
            dir: Only ``"fwd"`` is supported.
            is_permanent: Survives :meth:`reset_hooks` unless ``including_permanent``.
            prepend: Run before the hooks already attached.
        """
        if dir != "fwd":
            raise ValueError(f"dir must be 'fwd' (backward hooks are not supported), got {dir!r}")
        points = self._resolve(name)
        for point in points:
            point.add_hook(hook, is_permanent=is_permanent, prepend=prepend)

    def reset_hooks(self, including_permanent: bool = False) -> None:
        """Detach every temporary hook (and permanent ones when asked)."""
        for point in self.hook_dict.values():
            point.remove_hooks(including_permanent=including_permanent)

    @contextlib.contextmanager
    def hooks(
        self,
        fwd_hooks: Sequence[tuple[NameFilter, Callable[..., Any]]] = (),
        reset_hooks_end: bool = True,
    ) -> Iterator[HookedRootModule]:
        """Context manager: the hooks are attached inside the block and detached after it."""
        before = {name: list(point._fns) for name, point in self.hook_dict.items()}
        try:
            for name, fn in fwd_hooks:
                self.add_hook(name, fn)
            yield self
        finally:
            if reset_hooks_end:
                for name, point in self.hook_dict.items():
                    point._fns = before[name]

    def run_with_hooks(
        self,
        *model_args: Any,
        fwd_hooks: Sequence[tuple[NameFilter, Callable[..., Any]]] = (),
        reset_hooks_end: bool = True,
        **model_kwargs: Any,
    ) -> Any:
        """Run the model with ``fwd_hooks`` attached, then detach them.

        Args:
            fwd_hooks: Pairs ``(name or filter, hook function)``.
            reset_hooks_end: Detach the hooks afterwards (default).
            *model_args, **model_kwargs: Passed to ``forward``.
        """
        with self.hooks(fwd_hooks, reset_hooks_end=reset_hooks_end):
            return self(*model_args, **model_kwargs)

    def run_with_cache(
        self,
        *model_args: Any,
        names_filter: NameFilter = None,
        device: torch.device | str | None = None,
        **model_kwargs: Any,
    ) -> tuple[Any, ActivationCache]:
        """Run the model and record activations.

        Args:
            names_filter: Which hook points to record: a name, a list of names, a predicate, or
                ``None`` for all.
            device: Move recorded activations there (default: leave them where they are).

        Returns:
            The model's output and an :class:`ActivationCache` keyed by hook name.
        """
        store: dict[str, Tensor] = {}

        def record(tensor: Tensor, *, hook: HookPoint) -> None:
            store[hook.name] = tensor.detach() if device is None else tensor.detach().to(device)

        points = self._resolve(names_filter)
        out = self.run_with_hooks(
            *model_args, fwd_hooks=[(p.name, record) for p in points], **model_kwargs
        )
        return out, ActivationCache(store, self)
