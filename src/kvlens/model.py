"""The hooked transformer: embedding, blocks, unembedding, and the forward pass over a cache."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from kvlens import structure
from kvlens.cache.cache import KeyValueCache
from kvlens.cache.shared import SharedPrefixCache, share_frozen_prefix
from kvlens.components.block import TransformerBlock
from kvlens.components.embed import Embed
from kvlens.components.norm import make_norm
from kvlens.components.positions import PosEmbed, RotaryEmbedding
from kvlens.components.unembed import Unembed
from kvlens.config import ModelConfig
from kvlens.devices import get_device_for_block_index
from kvlens.generate import GenerationMixin
from kvlens.hook_options import HookOptionsMixin
from kvlens.hooks import HookedRootModule, HookPoint
from kvlens.loss import lm_cross_entropy_loss
from kvlens.model_loading import LoadingMixin
from kvlens.model_quantization import QuantizationMixin
from kvlens.pass_info import PassInfo
from kvlens.prepare import (
    Prepared,
    check_cache,
    check_residual,
    prepare_pass,
    tokens_from_input,
)
from kvlens.processing import WeightProcessing
from kvlens.tokens import PaddingSide, TokenizerMixin
from kvlens.weights import WeightsMixin

if TYPE_CHECKING:
    pass

ReturnType = Literal["logits", "loss", "both"] | None
_RETURN_TYPES = ("logits", "loss", "both", None)


class Output(NamedTuple):
    """What ``return_type="both"`` returns (TransformerLens's ``Output``)."""

    logits: Float[Tensor, "batch pos d_vocab"]
    loss: Tensor


class HookedTransformer(
    TokenizerMixin,
    GenerationMixin,
    WeightsMixin,
    LoadingMixin,
    QuantizationMixin,
    HookOptionsMixin,
    HookedRootModule,
):
    """A causal transformer with TransformerLens's hook points and a preallocated key-value cache.

    Modules and hook points keep TransformerLens's names: ``embed``, ``hook_embed``,
    ``pos_embed``/``hook_pos_embed`` (learned positions only), ``blocks.{i}`` (``ln1``, ``attn``,
    ``ln2``, ``mlp`` and the residual hooks), ``ln_final`` (when ``cfg.final_norm``), ``unembed``.
    Rotary models share one ``rotary`` table of cosines and sines (no parameters).

    Args:
        cfg: The architecture.
        tokenizer: An optional HF tokenizer kept as ``self.tokenizer``; its ``padding_side`` is
            set to ``default_padding_side`` (see :meth:`set_tokenizer`).
        init_weights: Draw the weight matrices from ``N(0, 0.02)`` (biases start at 0 and norm
            scales at 1 either way). Loaders pass ``False`` and fill every weight.
        default_padding_side: Where ``to_tokens`` pads a batch; TransformerLens's default,
            ``"right"``, whatever the tokenizer said.
    """

    hook_tokens: HookPoint  # declared only while cfg.use_hook_tokens is on

    def __init__(
        self,
        cfg: ModelConfig,
        tokenizer: Any = None,
        init_weights: bool = True,
        default_padding_side: PaddingSide = "right",
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self._fingerprint: str | None = None  # of the weights, see weights_fingerprint()
        self.weight_processing = WeightProcessing()  # what process_weights_ applied
        self._devices: list[torch.device] = []  # see _block_devices()
        self._devices_of: ModelConfig | None = None
        self.set_tokenizer(tokenizer, default_padding_side)
        with torch.device(get_device_for_block_index(0, cfg)):
            if cfg.use_hook_tokens:
                self.hook_tokens = HookPoint()  # [batch, pos]
            self.embed = Embed(cfg)
            self.hook_embed = HookPoint()  # [batch, pos, d_model]
            if cfg.positional_embedding_type == "standard":
                self.pos_embed = PosEmbed(cfg)
                self.hook_pos_embed = HookPoint()  # [batch, pos, d_model]
            else:
                self.rotary = RotaryEmbedding(cfg)
            self.blocks = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.n_layers))
            if cfg.final_norm:
                self.ln_final = make_norm(cfg)
            self.unembed = Unembed(cfg)
            self.position_ids: Tensor
            self.register_buffer("position_ids", torch.arange(cfg.n_ctx), persistent=False)
        if cfg.n_devices > 1:
            self._place_on_devices()
        if init_weights:
            self.init_weights()
        self.setup()

    def _place_on_devices(self) -> None:
        """Move each block to its device, and the output layers to the last block's."""
        for i, block in enumerate(self.blocks):
            block.to(get_device_for_block_index(i, self.cfg))
        last = get_device_for_block_index(self.cfg.n_layers - 1, self.cfg)
        self.unembed.to(last)
        if self.cfg.final_norm:
            self.ln_final.to(last)

    def _apply(self, fn: Any, recurse: bool = True) -> HookedTransformer:
        """Keep ``cfg.dtype`` and ``cfg.device`` in step with the weights after a move.

        Every move or cast of the whole model (``to``, ``cuda``, ``cpu``, ``half``, ``float``,
        ``double``, ``bfloat16``, ``to_empty``) goes through this method, so caches built from
        ``model.cfg`` afterwards (``generate``, ``prefill``, ``KeyValueCache.init_cache``) get the
        weights' dtype and device. A model split over ``cfg.n_devices`` devices is spread again
        from its new first device.
        """
        self.check_move(fn)
        super()._apply(fn, recurse)
        structure.changed()  # tensors may have been replaced: decode plans take them anew
        self._fingerprint = None
        # A float parameter on block 0's device: W_E, or block 0's first when W_E is quantized.
        weight = next(p for p in self.parameters() if p.is_floating_point())
        changes: dict[str, Any] = {}
        if weight.dtype != self.cfg.dtype:
            changes["dtype"] = weight.dtype
        moved = not _same_device(weight.device, get_device_for_block_index(0, self.cfg))
        if moved:
            changes["device"] = str(weight.device)
        if changes:
            self.cfg = self.cfg.replace(**changes)
        if moved and self.cfg.n_devices > 1:
            self._place_on_devices()
        return self

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``; the weights' fingerprint is computed anew after it."""
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        structure.changed()  # with assign=True tensors were replaced: decode plans take them anew
        self._fingerprint = None
        return result

    def weights_fingerprint(self) -> str:
        """A short hash of the weights, identifying this model to the caches it fills.

        Computed once (and again after ``load_state_dict`` or a move or cast): a hash of every
        parameter's name, shape and 64 values sampled evenly through it (and of every matrix's
        blocks in a quantized model). A cache records the
        fingerprint of the model that filled it, and ``forward`` and ``KeyValueCache.load``
        refuse a cache filled by another model. Editing weights in place afterwards (an
        ablation, say) does not change it: the model is still the one its caches came from.
        """
        if self._fingerprint is None:
            digest = hashlib.sha256()
            with torch.no_grad():
                for name, param in self._weights_to_fingerprint():
                    digest.update(f"{name}{tuple(param.shape)}{param.dtype}".encode())
                    if param.is_meta or param.numel() == 0:
                        continue
                    flat = param.detach().reshape(-1)
                    n, k = flat.numel(), min(64, flat.numel())
                    picks = torch.arange(k, dtype=torch.long) * (n - 1) // max(k - 1, 1)
                    sample = flat[picks.to(flat.device)]
                    digest.update(sample.to("cpu", torch.float64).numpy().tobytes())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def init_weights(self) -> None:
        """Draw every weight matrix (``W_*``) from ``N(0, 0.02)`` (GPT-2's initialisation)."""
        for name, param in self.named_parameters():
            if name.rsplit(".", 1)[-1].startswith("W_"):
                nn.init.normal_(param, std=0.02)

    # Forward ----------------------------------------------------------------------------------

    def forward(
        self,
        input: Int[Tensor, "batch pos"] | Float[Tensor, "batch pos d_model"],
        return_type: ReturnType = "logits",
        loss_per_token: bool = False,
        prepend_bos: bool | None = None,
        padding_side: PaddingSide | None = None,
        start_at_layer: int | None = None,
        tokens: Int[Tensor, "batch pos"] | None = None,
        shortformer_pos_embed: None = None,
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        stop_at_layer: int | None = None,
        past_kv_cache: KeyValueCache | SharedPrefixCache | None = None,
    ) -> Any:
        """Run the model on new tokens, reading and extending ``past_kv_cache``.

        The arguments are in TransformerLens 2.18's order, so ``model(tokens, "loss", True)`` is
        the per-token loss there and here; naming them is clearer. ``shortformer_pos_embed`` is
        there to keep that order: kvlens has no shortformer positions, and refuses one.

        Args:
            input: Token ids ``[batch, pos]`` (or ``[pos]``), a string or a list of strings
                (tokenized, padded on ``padding_side`` and masked), or token embeddings
                ``[batch, pos, d_model]`` (float) in place of ``embed(tokens)``: they pass
                ``hook_embed`` and get positions as embedded tokens would (every one real unless
                ``attention_mask`` says otherwise). With ``start_at_layer``: the residual stream
                ``[batch, pos, d_model]`` entering that block.
            return_type: ``"logits"``, ``"loss"`` (mean next-token cross-entropy), ``"both"``
                (an :class:`Output`) or ``None``.
            loss_per_token: Return the loss of every prediction, ``[batch, pos - 1]``.
            past_kv_cache: Keys and values of earlier tokens. The new tokens' positions continue
                from it, their keys and values and attention mask are appended to it (its length
                stays put if it is frozen). A frozen batch-1 cache with several rows of input is
                shared by them, stored and read once (see :class:`SharedPrefixCache`).
            attention_mask: The new tokens' mask, 1 real and 0 padding. A pad token consumes no
                position and no token attends to it. Default for token input: TransformerLens
                2.18's guess when the padding side is left or ``past_kv_cache`` is given (the
                run of pad tokens at the padded end of each row is padding; a BOS that is also
                the pad token stays real when BOS is prepended), otherwise all real. Text input
                is masked as it was tokenized.
            start_at_layer: Skip the embedding and the blocks before this one.
            stop_at_layer: Return the residual stream entering this block instead of logits.
            tokens: The tokens, for the loss when ``start_at_layer`` is given.
            prepend_bos: For text input: prepend BOS (default ``cfg.default_prepend_bos``). For
                token input without a mask: whether a leading pad that is the BOS token is real.
            padding_side: For a batch of texts: where padding goes; for token input without a
                mask: the end the rows are padded at. Default the tokenizer's.
        """
        if shortformer_pos_embed is not None:
            raise ValueError(
                "shortformer_pos_embed is not supported: kvlens has learned and rotary positions "
                "only"
            )
        if return_type not in _RETURN_TYPES:
            raise ValueError(f"return_type must be one of {_RETURN_TYPES}, got {return_type!r}")
        layers = range(self.cfg.n_layers)[start_at_layer:stop_at_layer]
        text_input = False
        if isinstance(input, (str, list, tuple)):
            text_input = True
            input, text_mask = self.to_tokens_and_mask(input, prepend_bos, padding_side)
            if attention_mask is None and bool((text_mask == 0).any()):
                attention_mask = text_mask
        embeds = None
        if (
            start_at_layer is None
            and isinstance(input, Tensor)
            and input.is_floating_point()
            and input.ndim == 3
        ):
            embeds = check_residual(input, self.cfg.d_model, "token embeddings input")
            embeds = embeds.to(self.embed.weight_device("W_E"))
            batch, n_new = embeds.shape[0], embeds.shape[1]
        elif start_at_layer is None:
            # The single place `input` becomes token ids.
            tokens = tokens_from_input(input, self.embed.weight_device("W_E"))
            batch, n_new = tokens.shape
            if attention_mask is None and not text_input:
                # Device work only: `prepare_pass`'s one host sync finds whether it masks anything.
                attention_mask = self._inferred_attention_mask(
                    tokens, past_kv_cache is not None, prepend_bos, padding_side
                )
        else:
            residual = check_residual(input, self.cfg.d_model)
            batch, n_new = residual.shape[0], residual.shape[1]
        past_kv_cache = share_frozen_prefix(past_kv_cache, batch)
        first_layer = min(layers.start, self.cfg.n_layers - 1)
        if past_kv_cache is not None:
            check_cache(self, past_kv_cache, batch, first_layer, self._block_devices())
        # All or nothing: if anything raises from here on (a hook, a kernel, an interrupt), the
        # cache goes back to this state, so a retry equals a clean run.
        owner = past_kv_cache.suffix if isinstance(past_kv_cache, SharedPrefixCache) else None
        owner = past_kv_cache if isinstance(past_kv_cache, KeyValueCache) else owner
        outer = self.pass_info
        state = owner.checkpoint() if owner is not None else None
        try:
            prep = prepare_pass(
                self,
                tokens if start_at_layer is None and embeds is None else None,
                batch,
                n_new,
                attention_mask,
                past_kv_cache,
                first_layer,
            )
            ctx = prep.ctx
            info = PassInfo(
                prep.positions,
                batch,
                ctx.prefix_len + ctx.own_len - n_new,
                n_new,
                self.generation_step,
            )
            self.set_pass_info(info)
            if embeds is not None:
                residual = self._embed(embeds, prep)
            elif start_at_layer is None:
                assert tokens is not None
                if self.cfg.use_hook_tokens:
                    tokens = self.hook_tokens(tokens)
                residual = self._embed(self.embed(tokens), prep)
            residual = self._run_blocks(residual, prep, layers, past_kv_cache)
            if stop_at_layer is None:
                out = self._output(residual, return_type, tokens, prep.loss_mask, loss_per_token)
            if owner is not None:
                owner.commit_attention_mask()
                if first_layer == 0:
                    fed_tokens = start_at_layer is None and embeds is None
                    owner.record_tokens(tokens if fed_tokens else None)
                owner.weights_fingerprint = self.weights_fingerprint()
        except BaseException:
            if owner is not None and state is not None:
                owner.restore(state)
            raise
        finally:
            self.set_pass_info(outer)  # a pass run from a hook leaves its caller's in place
        return residual if stop_at_layer is not None else out

    def _run_blocks(
        self,
        residual: Float[Tensor, "batch pos d_model"],
        prep: Prepared,
        layers: range,
        cache: KeyValueCache | SharedPrefixCache | None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """Run ``layers`` on the residual stream, each block with its entry of ``cache``."""
        for i in layers:
            if self.cfg.n_devices > 1:
                device = get_device_for_block_index(i, self.cfg)
                residual, prep = residual.to(device), prep.to(device)
            entry = cache[i] if cache is not None else None
            residual = self.blocks[i](residual, prep.ctx, entry)
        return residual

    def prefill(
        self,
        tokens: Int[Tensor, "batch pos"] | str,
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        capacity: int = 0,
    ) -> KeyValueCache:
        """Run ``tokens`` into a new cache and return it, e.g. a prefix for many continuations.

        ``model.generate(suffixes, past_kv_cache=model.prefill(prefix).freeze())`` continues one
        prefix in every row of ``suffixes`` while storing and reading its keys and values once
        (see :class:`~kvlens.cache.shared.SharedPrefixCache`).

        Args:
            tokens: Token ids ``[batch, pos]`` (or ``[pos]``), or a string.
            attention_mask: Their mask, 1 real and 0 padding; default as in :meth:`forward`
                with a cache (TransformerLens's guess from the pad tokens, for token input).
            capacity: Positions to preallocate; default exactly the tokens' (a frozen prefix
                never grows).

        Follows torch's grad mode like any forward pass: under grad the cache keeps the graph
        of its keys and values, so later passes can backpropagate into the prefix. Wrap it in
        ``torch.no_grad()`` (or ``torch.inference_mode()``) when no gradient is needed: it is
        then faster and holds no activations.
        """
        if isinstance(tokens, str):
            # Masked as tokenized: a pad-id token in the text (e.g. a final EOS) stays real.
            tokens, text_mask = self.to_tokens_and_mask(tokens)
            attention_mask = text_mask if attention_mask is None else attention_mask
        tokens = tokens_from_input(tokens, self.embed.weight_device("W_E"))
        batch, pos = tokens.shape
        cache = KeyValueCache.init_cache(self.cfg, self.cfg.device, batch, max(capacity, pos))
        self(tokens, return_type=None, past_kv_cache=cache, attention_mask=attention_mask)
        return cache  # the pass recorded its tokens (cache.tokens)

    def _output(
        self,
        residual: Float[Tensor, "batch pos d_model"],
        return_type: ReturnType,
        tokens: Tensor | None,
        loss_mask: Tensor | None,
        loss_per_token: bool,
    ) -> Any:
        if self.cfg.final_norm:
            residual = self.ln_final(residual)
        if return_type is None:
            return None
        logits = self.unembed(residual)
        if return_type == "logits":
            return logits
        if tokens is None:
            raise ValueError(f"return_type={return_type!r} with start_at_layer needs tokens=")
        loss = lm_cross_entropy_loss(logits, tokens, loss_mask, loss_per_token)
        return loss if return_type == "loss" else Output(logits, loss)

    def loss_fn(
        self,
        logits: Float[Tensor, "batch pos d_vocab"],
        tokens: Int[Tensor, "batch pos"],
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        per_token: bool = False,
    ) -> Tensor:
        """Next-token cross-entropy of ``logits`` against ``tokens`` (TransformerLens's
        ``loss_fn``): the mean, or ``[batch, pos - 1]`` with ``per_token``; ``attention_mask``
        leaves out the predictions of and from padding."""
        if tokens.device != logits.device:
            tokens = tokens.to(logits.device)
        return lm_cross_entropy_loss(logits, tokens, attention_mask, per_token)

    def _embed(self, embeds: Float[Tensor, "batch pos d_model"], prep: Prepared) -> Tensor:
        """The residual stream entering block 0 from the token embeddings."""
        residual = self.hook_embed(embeds)
        if self.cfg.positional_embedding_type == "standard":
            positions = prep.positions.expand(embeds.shape[0], -1)
            residual = residual + self.hook_pos_embed(self.pos_embed(positions, prep.pad_mask))
        return residual

    def _block_devices(self) -> list[torch.device]:
        """Each block's device as the config places it (computed once per config)."""
        if self._devices_of is not self.cfg:
            self._devices = [
                torch.device(get_device_for_block_index(i, self.cfg))
                for i in range(self.cfg.n_layers)
            ]
            self._devices_of = self.cfg
        return self._devices


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are one, reading a missing index as 0 (``"cuda"`` is ``"cuda:0"``)."""
    return a.type == b.type and (a.index or 0) == (b.index or 0)
