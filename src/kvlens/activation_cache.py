"""What ``run_with_cache`` returns: activations keyed by hook name, and their analysis."""

from __future__ import annotations

import difflib
import logging
import warnings
from collections.abc import Iterator
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor, nn

from kvlens.act_names import get_act_name
from kvlens.slice import Slice, SliceInput

logger = logging.getLogger(__name__)


class ActivationCache:
    """Activations recorded by ``run_with_cache``, keyed by hook name.

    Behaves like a read-only dict. Keys may also be given TransformerLens's short way:
    ``cache["pattern", 3]`` is ``cache["blocks.3.attn.hook_pattern"]``, ``cache["embed"]`` is
    ``cache["hook_embed"]`` and ``cache["resid_post", -1]`` is the last layer's.

    TransformerLens's analysis methods split the residual stream into parts, with its arguments,
    labels and shapes: :meth:`accumulated_resid`, :meth:`decompose_resid`,
    :meth:`stack_head_results`, :meth:`stack_neuron_results`, :meth:`get_full_resid_decomposition`,
    :meth:`apply_ln_to_stack` and :meth:`logit_attrs`. ``pos_slice`` and the other slices take
    :class:`~kvlens.slice.Slice`'s forms.

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

    def to(self, device: torch.device | str, move_model: bool = False) -> ActivationCache:
        """Move every activation to ``device``, in place (as TransformerLens); returns the cache.

        Args:
            device: Where the activations go.
            move_model: Move the model too (deprecated in TransformerLens, kept for its callers).
        """
        if move_model:
            warnings.warn(
                "ActivationCache.to(move_model=True) is deprecated",
                DeprecationWarning,
                stacklevel=2,
            )
            if self.model is not None:
                self.model.to(device)
        self._acts = {k: v.to(device) for k, v in self._acts.items()}
        return self

    def cpu(self) -> ActivationCache:
        """Move every activation to the CPU, in place; returns the cache."""
        return self.to("cpu")

    def toggle_autodiff(self, mode: bool = False) -> None:
        """Turn autograd on or off for the whole process (``torch.set_grad_enabled(mode)``).

        This changes global torch state, not only this cache; ``torch.inference_mode()`` as a
        context manager is the local alternative.
        """
        logger.warning("changed torch's global autograd state: grad enabled = %s", mode)
        torch.set_grad_enabled(mode)

    def apply_slice_to_batch_dim(self, batch_slice: SliceInput | Slice) -> ActivationCache:
        """A new cache with ``batch_slice`` applied to every activation's batch axis.

        An int slice drops the axis (the new cache has ``has_batch_dim=False``).

        Raises:
            ValueError: If the cache has no batch axis and the slice is not ``None``.
        """
        index = Slice(batch_slice)
        if not self.has_batch_dim and index.mode != "identity":
            raise ValueError("this cache has no batch axis to slice")
        keeps_batch = index.mode != "int" and self.has_batch_dim
        sliced = {name: index.apply(act, dim=0) for name, act in self._acts.items()}
        return ActivationCache(sliced, self.model, has_batch_dim=keeps_batch)

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

    # Analysis: the residual stream split into parts, as TransformerLens's methods split it ----

    def _analysed_model(self) -> Any:
        if self.model is None or getattr(self.model, "cfg", None) is None:
            raise ValueError("this analysis needs the cache's model (with a cfg); it has none")
        return self.model

    def _layer_count(self, layer: int | None) -> int:
        """How many layers a ``layer`` argument covers: ``None`` and ``-1`` mean all of them.

        A more negative layer counts back from there (``-2`` is ``n_layers - 1``), where
        TransformerLens takes only ``-1``.
        """
        n_layers = int(self._analysed_model().cfg.n_layers)
        count = n_layers if layer is None else layer + n_layers + 1 if layer < 0 else layer
        if not 0 <= count <= n_layers:
            raise ValueError(f"layer {layer} is out of range for a model of {n_layers} layers")
        return count

    def accumulated_resid(
        self,
        layer: int | None = None,
        incl_mid: bool = False,
        apply_ln: bool = False,
        pos_slice: SliceInput | Slice = None,
        mlp_input: bool = False,
        return_labels: bool = False,
    ) -> Tensor | tuple[Tensor, list[str]]:
        """The residual stream before each layer up to ``layer``, stacked on a new first axis.

        Labels are ``"{l}_pre"``, ``"{l}_mid"`` (with ``incl_mid``, or for the input of layer
        ``layer``'s MLP with ``mlp_input``) and ``"final_post"`` (when ``layer`` is the number of
        layers, its default). Parallel attention+MLP blocks have no ``resid_mid``: asking for
        one raises ``KeyError``, as in TransformerLens.

        Args:
            layer: Stop before this layer's input; ``None`` or ``-1``: the final residual.
            incl_mid: Add each layer's ``resid_mid``.
            apply_ln: Normalize with the recorded scales (:meth:`apply_ln_to_stack`); at the
                final residual every component goes through ``ln_final`` with its own statistics
                (the logit lens), weights included.
            pos_slice: Positions to keep (:class:`~kvlens.slice.Slice`; an int drops the axis).
            mlp_input: End at layer ``layer``'s ``resid_mid`` (its MLP's input).
            return_labels: Return ``(stack, labels)``.

        Returns:
            ``[component, batch, pos, d_model]`` (axes dropped as the cache and slice say).
        """
        cfg = self._analysed_model().cfg
        pos = Slice(pos_slice)
        layer = self._layer_count(layer)
        parts: list[Tensor] = []
        labels: list[str] = []
        for i in range(layer + 1):
            if i == cfg.n_layers:
                parts.append(self["resid_post", cfg.n_layers - 1])
                labels.append("final_post")
                continue
            parts.append(self["resid_pre", i])
            labels.append(f"{i}_pre")
            if (incl_mid and i < layer) or (mlp_input and i == layer):
                parts.append(self["resid_mid", i])
                labels.append(f"{i}_mid")
        stack = torch.stack([pos.apply(p, dim=-2) for p in parts])
        if apply_ln:
            stack = self.apply_ln_to_stack(
                stack, layer, mlp_input, pos, recompute_ln=layer == cfg.n_layers
            )
        return (stack, labels) if return_labels else stack

    def decompose_resid(
        self,
        layer: int | None = None,
        mlp_input: bool = False,
        mode: Literal["all", "mlp", "attn"] = "all",
        apply_ln: bool = False,
        pos_slice: SliceInput | Slice = None,
        incl_embeds: bool = True,
        return_labels: bool = False,
    ) -> Tensor | tuple[Tensor, list[str]]:
        """The outputs that sum to the residual stream before ``layer``, stacked.

        Labels: ``"embed"``, ``"pos_embed"`` (when recorded and ``incl_embeds``), then
        ``"{l}_attn_out"`` and ``"{l}_mlp_out"`` per layer (``mode`` keeps one kind), and with
        ``mlp_input`` layer ``layer``'s ``"{layer}_attn_out"``.
        """
        cfg = self._analysed_model().cfg
        pos = Slice(pos_slice)
        layer = self._layer_count(layer)
        incl_attn = mode != "mlp"
        incl_mlp = mode != "attn" and not getattr(cfg, "attn_only", False)
        parts: list[Tensor] = []
        labels: list[str] = []
        if incl_embeds:
            for name in ("embed", "pos_embed"):
                if f"hook_{name}" in self._acts:
                    parts.append(self[f"hook_{name}"])
                    labels.append(name)
        for i in range(layer):
            if incl_attn:
                parts.append(self["attn_out", i])
                labels.append(f"{i}_attn_out")
            if incl_mlp:
                parts.append(self["mlp_out", i])
                labels.append(f"{i}_mlp_out")
        if mlp_input and incl_attn:
            parts.append(self["attn_out", layer])
            labels.append(f"{layer}_attn_out")
        stack = torch.stack([pos.apply(p, dim=-2) for p in parts])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input, pos)
        return (stack, labels) if return_labels else stack

    def compute_head_results(self) -> None:
        """Add each head's output to the cache as ``blocks.{l}.attn.hook_result``.

        ``[batch, pos, head_index, d_model]``: ``hook_z`` times the head's ``W_O``, without
        ``b_O``. Nothing is done (but a warning) when the results are already there.
        """
        model = self._analysed_model()
        if "blocks.0.attn.hook_result" in self._acts:
            logger.warning("compute_head_results: the head results are already in the cache")
            return
        for i in range(model.cfg.n_layers):
            z = self["z", i, "attn"]
            W_O = model.blocks[i].attn.W_O.to(z.device)
            result = torch.einsum("...hd,hdm->...hm", z, W_O)
            self._acts[f"blocks.{i}.attn.hook_result"] = result

    def stack_head_results(
        self,
        layer: int = -1,
        return_labels: bool = False,
        incl_remainder: bool = False,
        pos_slice: SliceInput | Slice = None,
        apply_ln: bool = False,
    ) -> Tensor | tuple[Tensor, list[str]]:
        """Every head's output in the layers before ``layer``, one component per head.

        Labels are ``"L{l}H{h}"``, and ``"remainder"`` (the residual minus the heads) with
        ``incl_remainder``. Head results missing from the cache are computed and added first
        (:meth:`compute_head_results`).
        """
        model = self._analysed_model()
        pos = Slice(pos_slice)
        layer = self._layer_count(layer)
        if "blocks.0.attn.hook_result" not in self._acts:
            logger.info("stack_head_results: computing head results from hook_z and W_O")
            self.compute_head_results()
        heads = [pos.apply(self["result", i, "attn"], dim=-3) for i in range(layer)]
        labels = [f"L{i}H{h}" for i in range(layer) for h in range(model.cfg.n_heads)]
        return self._stack_units(heads, labels, layer, pos, incl_remainder, apply_ln, return_labels)

    def _stack_units(
        self,
        units: list[Tensor],
        labels: list[str],
        layer: int,
        pos: Slice,
        incl_remainder: bool,
        apply_ln: bool,
        return_labels: bool,
    ) -> Tensor | tuple[Tensor, list[str]]:
        """Per-layer ``[..., unit, d_model]`` outputs as one ``[unit, ..., d_model]`` stack."""
        if units:
            stack = torch.cat(units, dim=-2).movedim(-2, 0)
        else:  # no layers: an empty stack shaped like one residual
            like = pos.apply(self["hook_embed"], dim=-2)
            stack = like.new_zeros((0, *like.shape))
        if incl_remainder:
            remainder = pos.apply(self["resid_post", layer - 1], dim=-2) - stack.sum(dim=0)
            stack = torch.cat([stack, remainder[None]])
            labels = [*labels, "remainder"]
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos)
        return (stack, labels) if return_labels else stack

    def stack_activation(
        self, activation_name: str, layer: int = -1, sublayer_type: str | None = None
    ) -> Tensor:
        """One activation of each layer before ``layer`` (default: all), stacked on axis 0."""
        layer = self._layer_count(layer)
        return torch.stack([self[activation_name, i, sublayer_type] for i in range(layer)])

    def get_neuron_results(
        self,
        layer: int,
        neuron_slice: SliceInput | Slice = None,
        pos_slice: SliceInput | Slice = None,
    ) -> Tensor:
        """Each MLP neuron's output in ``layer``: ``[batch, pos, neuron, d_model]``.

        A neuron's activation (``hook_post``) times its row of ``W_out``, without ``b_out``.
        """
        acts = Slice(pos_slice).apply(self["post", layer, "mlp"], dim=-2)
        W_out = self._analysed_model().blocks[layer].mlp.W_out.to(acts.device)
        neurons = Slice(neuron_slice)
        return neurons.apply(acts, dim=-1)[..., None] * neurons.apply(W_out, dim=0)

    def stack_neuron_results(
        self,
        layer: int,
        pos_slice: SliceInput | Slice = None,
        neuron_slice: SliceInput | Slice = None,
        return_labels: bool = False,
        incl_remainder: bool = False,
        apply_ln: bool = False,
    ) -> Tensor | tuple[Tensor, list[str]]:
        """Every MLP neuron's output in the layers before ``layer``, one component per neuron.

        Labels are ``"L{l}N{n}"`` (and ``"remainder"``). An int ``neuron_slice`` keeps one
        neuron per layer as a component (TransformerLens fails on it).
        """
        model = self._analysed_model()
        pos = Slice(pos_slice)
        neurons = Slice.unwrap(neuron_slice)
        layer = self._layer_count(layer)
        kept = neurons.apply(torch.arange(model.cfg.d_mlp), dim=0).tolist()
        units = [self.get_neuron_results(i, neurons, pos) for i in range(layer)]
        labels = [f"L{i}N{n}" for i in range(layer) for n in kept]
        return self._stack_units(units, labels, layer, pos, incl_remainder, apply_ln, return_labels)

    def apply_ln_to_stack(
        self,
        residual_stack: Tensor,
        layer: int | None = None,
        mlp_input: bool = False,
        pos_slice: SliceInput | Slice = None,
        batch_slice: SliceInput | Slice = None,
        has_batch_dim: bool = True,
        recompute_ln: bool = False,
    ) -> Tensor:
        """Components of a residual, scaled as the norm before ``layer`` scaled the whole.

        As TransformerLens: each component is centered (LayerNorm only) and divided by the scale
        the norm recorded for the whole residual (``ln1``'s of ``layer``, ``ln2``'s with
        ``mlp_input``, ``ln_final``'s for the final residual), so that the components still add
        up to the normalized residual. The norm's weight and bias are not applied: that is
        exact for TransformerLens's default folded weights, and for unfolded ones (kvlens's
        weights as loaded) the result lacks the ``* w + b`` the norm would add. With
        ``recompute_ln`` at the final residual each component goes through ``ln_final`` itself
        (its own statistics, weight and bias): the logit lens.

        Args:
            residual_stack: ``[component, batch, pos, d_model]``, already sliced to
                ``pos_slice`` (the recorded scale is sliced here to match).
            layer: Which norm: ``None`` or ``-1`` for ``ln_final``.
            mlp_input: Use the layer's ``ln2``.
            pos_slice: The positions the stack holds.
            batch_slice: Batch rows to keep, applied to the stack (when ``has_batch_dim``) and
                to the scale.
            has_batch_dim: The stack has a batch axis (axis 1).
            recompute_ln: See above.
        """
        model = self._analysed_model()
        cfg = model.cfg
        pos, batch = Slice(pos_slice), Slice(batch_slice)
        layer = self._layer_count(layer)
        if has_batch_dim:
            residual_stack = batch.apply(residual_stack, dim=1)
        final = layer == cfg.n_layers
        if final and not hasattr(model, "ln_final"):
            return residual_stack  # nothing normalizes the final residual
        if recompute_ln and final:
            flat = residual_stack.reshape(-1, 1, residual_stack.shape[-1])
            return model.ln_final(flat).reshape(residual_stack.shape)
        if cfg.normalization_type == "LN":
            residual_stack = residual_stack - residual_stack.mean(dim=-1, keepdim=True)
        norm = "ln_final" if final else f"blocks.{layer}.ln{2 if mlp_input else 1}"
        scale = pos.apply(self[f"{norm}.hook_scale"], dim=-2)
        if self.has_batch_dim:
            scale = batch.apply(scale, dim=0)
        return residual_stack / scale

    def logit_attrs(
        self,
        residual_stack: Tensor,
        tokens: str | int | Tensor,
        incorrect_tokens: str | int | Tensor | None = None,
        pos_slice: SliceInput | Slice = None,
        batch_slice: SliceInput | Slice = None,
        has_batch_dim: bool = True,
    ) -> Tensor:
        """How much each component adds to the logits of ``tokens`` (minus ``incorrect_tokens``).

        The components are scaled by ``ln_final``'s recorded scale (:meth:`apply_ln_to_stack`)
        and dotted with the tokens' unembedding directions
        (``model.tokens_to_residual_directions``).

        Returns:
            ``[component, batch, pos]`` (axes as the stack and the tokens have them).

        Raises:
            ValueError: If ``tokens`` and ``incorrect_tokens`` differ in shape.
        """
        model = self._analysed_model()
        directions = model.tokens_to_residual_directions(tokens)
        if incorrect_tokens is not None:
            if _token_shape(model, tokens) != _token_shape(model, incorrect_tokens):
                raise ValueError(
                    f"tokens and incorrect_tokens must have one shape; tokens have "
                    f"{_token_shape(model, tokens)}, incorrect_tokens "
                    f"{_token_shape(model, incorrect_tokens)}"
                )
            directions = directions - model.tokens_to_residual_directions(incorrect_tokens)
        scaled = self.apply_ln_to_stack(
            residual_stack,
            layer=-1,
            pos_slice=pos_slice,
            batch_slice=batch_slice,
            has_batch_dim=has_batch_dim,
        )
        return (scaled * directions).sum(dim=-1)

    def get_full_resid_decomposition(
        self,
        layer: int | None = None,
        mlp_input: bool = False,
        expand_neurons: bool = True,
        apply_ln: bool = False,
        pos_slice: SliceInput | Slice = None,
        return_labels: bool = False,
    ) -> Tensor | tuple[Tensor, list[str]]:
        """The residual before ``layer`` as the sum of every head, neuron (or MLP), embedding
        and the biases.

        Labels: ``"L{l}H{h}"`` per head, ``"L{l}N{n}"`` per neuron (or ``"{l}_mlp_out"`` per
        MLP without ``expand_neurons``), ``"embed"``, ``"pos_embed"``, and ``"bias"`` (the
        attention output biases, and MLP output biases when the neurons are expanded; a
        missing bias counts as zeros).
        """
        cfg = self._analysed_model().cfg
        pos = Slice(pos_slice)
        layer = self._layer_count(layer)
        heads, labels = self.stack_head_results(
            layer + (1 if mlp_input else 0), pos_slice=pos, return_labels=True
        )
        parts = [heads]
        if not getattr(cfg, "attn_only", False) and layer > 0:
            if expand_neurons:
                mlps, mlp_labels = self.stack_neuron_results(layer, pos, return_labels=True)
            else:
                mlps, mlp_labels = self.decompose_resid(
                    layer, mlp_input, "mlp", pos_slice=pos, incl_embeds=False, return_labels=True
                )
            parts.append(mlps)
            labels = [*labels, *mlp_labels]
        for name in ("embed", "pos_embed"):
            if f"hook_{name}" in self._acts:
                parts.append(pos.apply(self[f"hook_{name}"], dim=-2)[None])
                labels.append(name)
        bias = self._accumulated_bias(layer, mlp_input, expand_neurons).to(heads.device)
        parts.append(bias.expand((1, *heads.shape[1:])))
        labels.append("bias")
        stack = torch.cat(parts)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input, pos)
        return (stack, labels) if return_labels else stack

    def _accumulated_bias(
        self, layer: int, mlp_input: bool, include_mlp_biases: bool
    ) -> Float[Tensor, " d_model"]:
        """The output biases added before layer ``layer`` (and its ``b_O`` with ``mlp_input``)."""
        model = self._analysed_model()
        if mlp_input and layer >= model.cfg.n_layers:
            raise ValueError("mlp_input needs a layer below n_layers: no MLP after the last")
        biases: list[Tensor | None] = []
        for i in range(layer):
            biases.append(model.blocks[i].attn.b_O)
            if include_mlp_biases:
                biases.append(model.blocks[i].mlp.b_out)
        if mlp_input:
            biases.append(model.blocks[layer].attn.b_O)
        total = torch.zeros(model.cfg.d_model, dtype=self["hook_embed"].dtype)
        for bias in biases:
            if bias is not None:
                total = total + bias.to(total.device)
        return total

    def __repr__(self) -> str:
        return f"ActivationCache({len(self._acts)} activations)"


def _token_shape(model: Any, tokens: str | int | Tensor) -> tuple[int, ...]:
    """The shape of ``tokens`` as ``logit_attrs`` compares it: a str or int is one token."""
    if isinstance(tokens, (str, int)):
        return ()
    return tuple(torch.as_tensor(tokens).shape)
