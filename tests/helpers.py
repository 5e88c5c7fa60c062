"""Tiny random HF models of every supported family, and kvlens conversions of them.

Every parameter is drawn at random (HF initialises biases to 0 and norm scales to 1, which would
hide a misplaced bias), with a fixed seed. Sizes stay within the test budget: at most 3 layers,
``d_model <= 64``, vocabulary <= 128.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from kvlens.model import HookedTransformer

FAMILIES = ("gpt2", "pythia", "llama", "mistral", "qwen2")
# Families with sliding-window layers (Mistral and Qwen2 with a window given by their overrides,
# see ``WINDOW_OVERRIDES``); kept apart from ``FAMILIES``, which many tests iterate.
WINDOW_FAMILIES = ("gemma2", "mistral", "qwen2")
# Tiny windows for Mistral (every layer) and Qwen2 (layers from ``max_window_layers`` on).
WINDOW_OVERRIDES: dict[str, dict[str, Any]] = {
    "gemma2": {},
    "mistral": dict(sliding_window=5),
    "qwen2": dict(use_sliding_window=True, sliding_window=5, max_window_layers=1),
}
VOCAB = 97
N_CTX = 64


def hf_config(family: str, **overrides: Any) -> Any:
    """A tiny ``transformers`` config of ``family`` (``overrides`` replace its fields)."""
    import transformers

    if family == "gpt2":
        fields: dict[str, Any] = dict(n_layer=2, n_embd=32, n_head=4, n_positions=N_CTX)
        cls: Any = transformers.GPT2Config
    elif family == "pythia":
        fields = dict(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=N_CTX,
            rotary_pct=0.5,
            use_parallel_residual=True,
        )
        cls = transformers.GPTNeoXConfig
    elif family in ("llama", "mistral", "qwen2"):
        kv_heads = {"llama": 2, "mistral": 1, "qwen2": 2}[family]
        fields = dict(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=kv_heads,
            intermediate_size=48,
            max_position_embeddings=N_CTX,
            rope_theta=500.0,
        )
        if family == "qwen2":
            fields["tie_word_embeddings"] = True
        cls = {
            "llama": transformers.LlamaConfig,
            "mistral": transformers.MistralConfig,
            "qwen2": transformers.Qwen2Config,
        }[family]
    elif family == "gemma2":
        # Soft caps small enough to bend tiny random scores and logits; layer 0 is local.
        fields = dict(
            num_hidden_layers=3,
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            intermediate_size=48,
            max_position_embeddings=N_CTX,
            rope_theta=500.0,
            query_pre_attn_scalar=12,
            sliding_window=6,
            attn_logit_softcapping=3.0,
            final_logit_softcapping=3.0,
        )
        cls = transformers.Gemma2Config
    else:
        raise ValueError(f"unknown family {family!r}; known: {(*FAMILIES, 'gemma2')}")
    fields["vocab_size"] = VOCAB
    fields.update(overrides)
    return cls(**fields)


def make_hf_model(family: str, seed: int = 0, **overrides: Any) -> Any:
    """A tiny HF causal LM of ``family`` with every parameter random, in eval mode, fp32."""
    import transformers

    config = hf_config(family, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1 and name.endswith("weight"):  # norm scales
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif param.ndim == 1:  # biases
                param.copy_(0.2 * torch.randn_like(param))
            else:
                param.copy_(0.15 * torch.randn_like(param))
    return model.eval()


@functools.cache
def model_pair(family: str) -> tuple[Any, HookedTransformer]:
    """``(hf_model, kvlens_model)`` for ``family``, built once per test session.

    Tests must leave both unchanged (hooks are reset by the context managers that add them).
    """
    hf_model = make_hf_model(family)
    return hf_model, HookedTransformer.from_hf_model(hf_model)


def tokens_for(seed: int, batch: int, pos: int) -> torch.Tensor:
    """Random token ids ``[batch, pos]`` from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, pos), generator=gen)


def padding_mask(
    batch: int, pos: int, side: str, pads: tuple[int, ...] = (0, 2, 3)
) -> torch.Tensor:
    """A ``[batch, pos]`` mask with ``pads[i]`` pad tokens on ``side`` of row ``i``.

    ``side`` is ``"left"``, ``"right"`` or ``"none"`` (all ones).
    """
    mask = torch.ones(batch, pos, dtype=torch.long)
    if side == "none":
        return mask
    for row in range(batch):
        n_pad = pads[row % len(pads)]
        if n_pad == 0:
            continue
        if side == "left":
            mask[row, :n_pad] = 0
        elif side == "right":
            mask[row, pos - n_pad :] = 0
        else:
            raise ValueError(f"side must be 'left', 'right' or 'none', got {side!r}")
    return mask


def hf_positions(mask: torch.Tensor) -> torch.Tensor:
    """The position ids HF's ``generate`` derives from a mask: pad tokens consume none."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def tiny_tokenizer() -> Any:
    """A word-level fast tokenizer over ``VOCAB`` ids: ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2
    (Gemma's ids), then ``w3 .. w96``; it adds no BOS itself. Built in memory, nothing read."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2} | {f"w{i}": i for i in range(3, VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
