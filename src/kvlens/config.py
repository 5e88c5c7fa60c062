"""The typed, frozen configuration every kvlens module reads."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

import torch

ActFn = Literal["gelu", "gelu_new", "gelu_pytorch_tanh", "silu", "relu"]
NormType = Literal["LN", "RMS"]
PositionalEmbeddingType = Literal["standard", "rotary"]

_ACT_FNS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "silu", "relu")
_NORMS = ("LN", "RMS")
_POS_TYPES = ("standard", "rotary")
AttnType = Literal["global", "local"]
_ATTN_TYPES = ("global", "local")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True)
class ModelConfig:
    """Shape and architecture of a causal transformer.

    Field names follow TransformerLens's ``HookedTransformerConfig`` so that code written for it
    reads the same here. The dataclass is frozen: derive a variant with
    :func:`dataclasses.replace` (or :meth:`replace`).

    Attributes:
        n_layers: Number of transformer blocks.
        d_model: Width of the residual stream.
        n_heads: Number of query heads.
        d_head: Width of one attention head.
        n_ctx: Longest sequence the model supports (positions ``0 .. n_ctx - 1``).
        d_vocab: Vocabulary size (rows of the embedding, columns of the unembedding).
        d_mlp: Hidden width of the MLP. ``None`` means ``4 * d_model``.
        n_key_value_heads: Key/value heads for grouped- or multi-query attention; ``None`` means
            as many as ``n_heads`` (multi-head attention).
        act_fn: MLP activation.
        normalization_type: ``"LN"`` (LayerNorm with bias) or ``"RMS"`` (RMSNorm).
        eps: Epsilon of the normalization layers.
        positional_embedding_type: ``"standard"`` (learned absolute) or ``"rotary"``.
        rotary_dim: Dimensions of each head that rotary rotates (``None``: all of ``d_head``).
        rotary_base: Base (theta) of the rotary frequencies.
        rotary_adjacent_pairs: ``True`` rotates adjacent pairs ``(0, 1), (2, 3), ...``
            (GPT-J style); ``False`` rotates ``(i, i + rotary_dim / 2)`` (GPT-NeoX / Llama style).
        gated_mlp: ``act(x W_gate) * (x W_in)`` then ``W_out`` (Llama) instead of a plain MLP.
        parallel_attn_mlp: Attention and MLP read the same residual and add in parallel (GPT-NeoX).
        attn_qkv_bias: Query, key and value projections have a bias (GPT-2, NeoX, Qwen2).
        attn_out_bias: The attention output projection has a bias.
        mlp_bias: The MLP projections have biases.
        unembed_bias: The unembedding has a bias.
        final_norm: A normalization before the unembedding.
        dtype: Dtype of the weights and of the key-value cache.
        device: Device of the weights (``None``: torch's default).
        n_devices: Devices the blocks are split over (see ``get_device_for_block_index``).
        model_name: A label for messages and cache fingerprints.
        original_architecture: The architecture the weights came from (e.g. ``"LlamaForCausalLM"``).
        default_prepend_bos: Whether tokenization prepends BOS unless told otherwise.
        attn_scale: What ``q . k`` is divided by before the softmax; ``None`` means
            ``sqrt(d_head)`` (Gemma 2: ``sqrt(query_pre_attn_scalar)``).
        attn_scores_soft_cap: Attention scores become ``c * tanh(scores / c)`` (Gemma 2);
            ``-1`` (TransformerLens's value) turns it off.
        output_logits_soft_cap: The logits become ``c * tanh(logits / c)``; ``-1`` is off.
        window_size: Sliding-window attention: a query in a ``"local"`` layer sees at most this
            many keys, itself and the ones just before it (by cache index, as Hugging Face
            counts). ``None``: no layer has a window.
        attn_types: Each layer's ``"global"`` or ``"local"`` (windowed) attention, one per layer;
            ``None`` with a ``window_size`` means every layer is local (Mistral).
        use_normalization_before_and_after: Norms after attention and after the MLP too
            (``ln1_post``, ``ln2_post``; Gemma 2), before each output joins the residual stream.
        use_attn_result: Compute each head's contribution to the residual stream,
            ``blocks.{i}.attn.hook_result`` ``[batch, pos, head_index, d_model]``, and sum them
            (memory hungry: ``d_model`` per head per token).
        use_split_qkv_input: Give each head its own query, key and value input,
            ``blocks.{i}.hook_q_input`` ``[batch, pos, head_index, d_model]`` and
            ``hook_k_input``/``hook_v_input`` ``[batch, pos, kv_head, d_model]``, each normalized
            by ``ln1`` separately.
        use_attn_in: Give each head its own input, ``blocks.{i}.hook_attn_in``
            ``[batch, pos, head_index, d_model]``, shared by its query, key and value (not with
            grouped-query attention; ignored, though it fires, under ``use_split_qkv_input``).
        use_hook_mlp_in: ``blocks.{i}.hook_mlp_in`` ``[batch, pos, d_model]``, the MLP's input
            before ``ln2``.
        use_hook_tokens: ``hook_tokens`` ``[batch, pos]``, the token ids just before the
            embedding.

    The five ``use_*`` hook options only add hook points (TransformerLens's
    ``HookedTransformer.set_use_*`` turn them on in a loaded model); they do not change what a
    cache holds, so :meth:`fingerprint` leaves them out.
    """

    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    n_ctx: int
    d_vocab: int
    d_mlp: int | None = None
    n_key_value_heads: int | None = None
    act_fn: ActFn = "gelu_new"
    normalization_type: NormType = "LN"
    eps: float = 1e-5
    positional_embedding_type: PositionalEmbeddingType = "standard"
    rotary_dim: int | None = None
    rotary_base: float = 10000.0
    rotary_adjacent_pairs: bool = False
    gated_mlp: bool = False
    parallel_attn_mlp: bool = False
    attn_qkv_bias: bool = True
    attn_out_bias: bool = True
    mlp_bias: bool = True
    unembed_bias: bool = False
    final_norm: bool = True
    dtype: torch.dtype = torch.float32
    device: str | None = None
    n_devices: int = 1
    model_name: str = "custom"
    original_architecture: str | None = None
    default_prepend_bos: bool = True
    attn_scale: float | None = None
    attn_scores_soft_cap: float = -1.0
    output_logits_soft_cap: float = -1.0
    window_size: int | None = None
    attn_types: tuple[AttnType, ...] | None = None
    use_normalization_before_and_after: bool = False
    use_attn_result: bool = False
    use_split_qkv_input: bool = False
    use_attn_in: bool = False
    use_hook_mlp_in: bool = False
    use_hook_tokens: bool = False

    def __post_init__(self) -> None:
        for name in ("n_layers", "d_model", "n_heads", "d_head", "n_ctx", "d_vocab", "n_devices"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.d_mlp is not None and (not _is_int(self.d_mlp) or self.d_mlp < 1):
            raise ValueError(
                f"ModelConfig.d_mlp must be a positive int or None, got {self.d_mlp!r}"
            )
        kv = self.n_key_value_heads
        if kv is not None and (not _is_int(kv) or kv < 1 or self.n_heads % kv != 0):
            raise ValueError(
                "ModelConfig.n_key_value_heads must be a positive divisor of n_heads="
                f"{self.n_heads} or None, got {kv!r}"
            )
        if self.act_fn not in _ACT_FNS:
            raise ValueError(f"ModelConfig.act_fn must be one of {_ACT_FNS}, got {self.act_fn!r}")
        if self.normalization_type not in _NORMS:
            raise ValueError(
                f"ModelConfig.normalization_type must be one of {_NORMS}, "
                f"got {self.normalization_type!r}"
            )
        if self.positional_embedding_type not in _POS_TYPES:
            raise ValueError(
                f"ModelConfig.positional_embedding_type must be one of {_POS_TYPES}, "
                f"got {self.positional_embedding_type!r}"
            )
        rd = self.rotary_dim
        if rd is not None and (not _is_int(rd) or rd < 2 or rd > self.d_head or rd % 2):
            raise ValueError(
                f"ModelConfig.rotary_dim must be an even int in [2, d_head={self.d_head}] or None, "
                f"got {rd!r}"
            )
        for name in ("eps", "rotary_base"):
            value = getattr(self, name)
            # `not value > 0` also rejects NaN.
            if not _is_real(value) or not value > 0:
                raise ValueError(f"ModelConfig.{name} must be a number > 0, got {value!r}")
        self._check_attention_fields()
        for name in HOOK_OPTIONS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModelConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.use_attn_in and self.n_key_value_heads is not None:
            raise ValueError(
                "ModelConfig.use_attn_in needs multi-head attention (n_key_value_heads=None), got "
                f"n_key_value_heads={self.n_key_value_heads}; use use_split_qkv_input instead"
            )
        if self.dtype not in _FLOAT_DTYPES:
            raise ValueError(
                f"ModelConfig.dtype must be one of {_FLOAT_DTYPES}, got {self.dtype!r}"
            )

    def _check_attention_fields(self) -> None:
        scale = self.attn_scale
        if scale is not None and (not _is_real(scale) or not scale > 0):
            raise ValueError(f"ModelConfig.attn_scale must be a number > 0 or None, got {scale!r}")
        for name in ("attn_scores_soft_cap", "output_logits_soft_cap"):
            cap = getattr(self, name)
            if not _is_real(cap) or not (cap > 0 or cap == -1):
                raise ValueError(
                    f"ModelConfig.{name} must be a number > 0, or -1 (off), got {cap!r}"
                )
        window = self.window_size
        if window is not None and (not _is_int(window) or window < 1):
            raise ValueError(
                f"ModelConfig.window_size must be a positive int or None, got {window!r}"
            )
        types = self.attn_types
        if types is not None:
            if isinstance(types, list):
                object.__setattr__(self, "attn_types", tuple(types))
                types = self.attn_types
            if (
                not isinstance(types, tuple)
                or len(types) != self.n_layers
                or any(t not in _ATTN_TYPES for t in types)
            ):
                raise ValueError(
                    f"ModelConfig.attn_types must hold one of {_ATTN_TYPES} per layer "
                    f"(n_layers={self.n_layers}) or be None, got {types!r}"
                )
            if "local" in types and window is None:
                raise ValueError("ModelConfig.attn_types has local layers but window_size is None")

    # Derived values ---------------------------------------------------------------------------

    @property
    def n_kv_heads(self) -> int:
        """Key/value heads actually stored: ``n_key_value_heads`` or ``n_heads``."""
        return self.n_key_value_heads if self.n_key_value_heads is not None else self.n_heads

    @property
    def d_mlp_resolved(self) -> int:
        """The MLP width, ``4 * d_model`` when ``d_mlp`` is None."""
        return self.d_mlp if self.d_mlp is not None else 4 * self.d_model

    @property
    def rotary_dim_resolved(self) -> int:
        """Dimensions of each head that rotary rotates."""
        return self.rotary_dim if self.rotary_dim is not None else self.d_head

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of layer ``layer``'s attention, or ``None`` for global attention."""
        if self.window_size is None:
            return None
        if self.attn_types is None or self.attn_types[layer] == "local":
            return self.window_size
        return None

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes the key-value cache holds per token per batch row, all layers together."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.n_layers * self.n_kv_heads * self.d_head * itemsize

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable fields (dtype as its name, e.g. ``"float32"``)."""
        out = dataclasses.asdict(self)
        out["dtype"] = str(self.dtype).removeprefix("torch.")
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}; known: {sorted(known)}")
        data = dict(data)
        if isinstance(data.get("dtype"), str):
            # An unknown name stays a string, which __post_init__ rejects naming the field.
            data["dtype"] = getattr(torch, data["dtype"], data["dtype"])
        return cls(**data)

    def fingerprint(self) -> str:
        """A short hash of the fields that decide the cache's layout and meaning.

        Device, ``n_devices``, tokenization defaults and the hook options (:data:`HOOK_OPTIONS`)
        are left out: a cache made on one device, or before a hook option was turned on, is valid.
        """
        fields = self.to_dict()
        for name in ("device", "n_devices", "default_prepend_bos", *HOOK_OPTIONS):
            fields.pop(name)
        # Fields added after caches were first saved count only when set, so a cache saved
        # before they existed keeps its fingerprint.
        for name, default in _LATER_FIELDS.items():
            if fields[name] == default:
                fields.pop(name)
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


HOOK_OPTIONS = (
    "use_attn_result",
    "use_split_qkv_input",
    "use_attn_in",
    "use_hook_mlp_in",
    "use_hook_tokens",
)
"""The config fields that only add hook points (TransformerLens's ``set_use_*`` options)."""

_LATER_FIELDS: dict[str, Any] = {
    "attn_scale": None,
    "attn_scores_soft_cap": -1.0,
    "output_logits_soft_cap": -1.0,
    "window_size": None,
    "attn_types": None,
    "use_normalization_before_and_after": False,
}


def _is_int(value: object) -> bool:
    """An int that is not a bool (``True`` would otherwise pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# TransformerLens's name for the same thing.
HookedTransformerConfig = ModelConfig
