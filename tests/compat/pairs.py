"""Tiny random kvlens models of each family, their TL twins, and a tiny offline tokenizer.

Every kvlens parameter is drawn at random with a fixed seed (biases and norm scales too, so a
misplaced bias shows), then copied into TransformerLens by :mod:`tests.compat.bridge`. The
unembedding is drawn larger than the rest so greedy choices are far from ties.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from tests.compat.bridge import to_transformer_lens

from kvlens import ModelConfig
from kvlens.model import HookedTransformer

FAMILIES = ("gpt2", "neox", "llama")
N_CTX = 32

# Token ids of the tokenizer: specials first, then one id per word.
SPECIALS = ("<unk>", "<bos>", "<eos>", "<pad>")
_WORD_TEXT = (
    "the a an of to in on at is was and or but not cat dog bird fish tree house river road "
    "red green blue small big old new fast slow one two three four five sat ran flew swam "
    "saw made took gave went came said it they we you he she this that there here when then "
    "because"
)
WORDS = tuple(_WORD_TEXT.split())
D_VOCAB = len(SPECIALS) + len(WORDS)
BOS, EOS, PAD = 1, 2, 3


@dataclass(frozen=True)
class Pair:
    """The same weights as a kvlens model and as a TransformerLens model."""

    family: str
    kv: HookedTransformer
    tl: Any


def kvlens_config(family: str, d_vocab: int = D_VOCAB) -> ModelConfig:
    """A tiny config of ``family``: ``gpt2``, ``neox`` or ``llama`` (grouped-query)."""
    common: dict[str, Any] = dict(n_layers=2, d_model=32, n_heads=4, d_head=8, n_ctx=N_CTX)
    if family == "gpt2":
        fields: dict[str, Any] = dict(
            d_mlp=64,
            act_fn="gelu_new",
            normalization_type="LN",
            positional_embedding_type="standard",
            original_architecture="GPT2LMHeadModel",
        )
    elif family == "neox":
        fields = dict(
            d_mlp=64,
            act_fn="gelu",
            normalization_type="LN",
            positional_embedding_type="rotary",
            rotary_dim=4,  # rotary_pct 0.5: half of each head rotates
            rotary_base=10000.0,
            parallel_attn_mlp=True,
            original_architecture="GPTNeoXForCausalLM",
        )
    elif family == "llama":
        fields = dict(
            d_mlp=48,
            n_key_value_heads=2,
            act_fn="silu",
            normalization_type="RMS",
            eps=1e-6,
            positional_embedding_type="rotary",
            rotary_base=500.0,
            gated_mlp=True,
            attn_qkv_bias=False,
            attn_out_bias=False,
            mlp_bias=False,
            original_architecture="LlamaForCausalLM",
        )
    else:
        raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")
    return ModelConfig(**common, **fields, d_vocab=d_vocab, model_name=f"tiny-{family}")


def random_kvlens_model(
    family: str,
    seed: int = 0,
    tokenizer: Any = None,
    default_padding_side: str = "right",
) -> HookedTransformer:
    """A kvlens model of ``family`` with every parameter drawn at random, in eval mode.

    Like TL's, kvlens's constructor sets ``tokenizer.padding_side``: give each model its own
    tokenizer object.
    """
    cfg = kvlens_config(family)
    if tokenizer is None:
        model = HookedTransformer(cfg)
    else:
        model = HookedTransformer(
            cfg, tokenizer=tokenizer, default_padding_side=default_padding_side
        )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=param.dtype)
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "w":  # norm scales
                param.copy_(1.0 + 0.2 * noise)
            elif param.ndim == 1:  # biases
                param.copy_(0.2 * noise)
            elif leaf == "W_U":
                param.copy_(noise)
            else:
                param.copy_(0.15 * noise)
    return model.eval()


def tiny_tokenizer() -> Any:
    """A new word-level HF tokenizer over :data:`WORDS`, built offline; it says "pad left".

    It says ``padding_side="left"`` (as SmolLM2's does) so the tests see that both libraries
    pad where the model says, not where the tokenizer object did. BOS, EOS and pad are distinct
    tokens, none of them id 0.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate((*SPECIALS, *WORDS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


@functools.cache
def model_pair(family: str) -> Pair:
    """The pair of ``family`` without a tokenizer, built once per session.

    Tests share it: the fixtures in ``conftest.py`` remove hooks and gradients around each test.
    """
    kv = random_kvlens_model(family)
    return Pair(family, kv, to_transformer_lens(kv))


@functools.cache
def text_pair(family: str, padding_side: str = "right") -> Pair:
    """The pair of ``family``, each model with its own :func:`tiny_tokenizer`.

    ``padding_side`` is both models' ``default_padding_side`` ("right" is TL's default).
    """
    kv = random_kvlens_model(family, tokenizer=tiny_tokenizer(), default_padding_side=padding_side)
    return Pair(family, kv, to_transformer_lens(kv, tiny_tokenizer(), padding_side))


def random_tokens(seed: int, batch: int, pos: int, low: int = len(SPECIALS)) -> torch.Tensor:
    """Token ids ``[batch, pos]`` drawn from the word ids (no specials) with a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, D_VOCAB, (batch, pos), generator=gen)


# fp32 on both sides; the libraries order some float operations differently (TL's einsums and
# repeated keys, kvlens's fused projections), which moves logits of size ~20 by ~1e-5.
TOL = dict(atol=1e-4, rtol=1e-5)


def assert_same(kv: torch.Tensor, tl: torch.Tensor, what: str = "") -> None:
    """``kv`` equals ``tl`` in shape and, within :data:`TOL`, in value."""
    torch.testing.assert_close(kv, tl, **TOL, msg=lambda m: f"{what}: {m}")
