"""Pre-tokenizers named by a GGUF file's ``tokenizer.ggml.pre`` field.

llama.cpp picks the regular expressions that split text before BPE from this name (see its
``llama-vocab.cpp``). Each entry here rebuilds the same split with the ``tokenizers`` library,
matching the original model's ``tokenizer.json``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from tokenizers.pre_tokenizers import PreTokenizer

logger = logging.getLogger(__name__)

# Llama 3's split: case-insensitive contractions, letters with one leading non-letter, digit
# runs of at most three, punctuation runs, newlines, other whitespace.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class PreTokenizerSpec:
    """How one ``tokenizer.ggml.pre`` value splits text.

    Attributes:
        style: ``"gpt2"`` (GPT-2's byte-level regex), ``"gpt2_digits"`` (every digit alone,
            then GPT-2's regex) or ``"llama3"`` (:data:`LLAMA3_PATTERN`).
        ignore_merges: Whether a pre-token found whole in the vocabulary skips BPE merging.
    """

    style: Literal["gpt2", "gpt2_digits", "llama3"]
    ignore_merges: bool = False


_GPT2 = PreTokenizerSpec("gpt2")
_GPT2_DIGITS = PreTokenizerSpec("gpt2_digits")
_LLAMA3 = PreTokenizerSpec("llama3", ignore_merges=True)

PRE_TOKENIZERS: dict[str, PreTokenizerSpec] = {
    "gpt-2": _GPT2,
    "gpt2": _GPT2,
    "smollm": _GPT2_DIGITS,
    "starcoder": _GPT2_DIGITS,
    "refact": _GPT2_DIGITS,
    "llama-bpe": _LLAMA3,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
}


def spec_for(pre: str | None) -> PreTokenizerSpec:
    """The spec for a ``tokenizer.ggml.pre`` value; GPT-2's when the field is absent.

    Raises:
        ValueError: ``pre`` names a pre-tokenizer this module does not know.
    """
    if pre is None:
        logger.warning("GGUF file has no tokenizer.ggml.pre field; using GPT-2's pre-tokenizer")
        return _GPT2
    if pre not in PRE_TOKENIZERS:
        raise ValueError(
            f"GGUF tokenizer.ggml.pre {pre!r} is not supported; supported: {sorted(PRE_TOKENIZERS)}"
        )
    return PRE_TOKENIZERS[pre]


def build_pre_tokenizer(spec: PreTokenizerSpec) -> PreTokenizer:
    """A ``tokenizers`` pre-tokenizer that splits text as ``spec`` says, then maps bytes."""
    from tokenizers import Regex, pre_tokenizers

    if spec.style == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True)
    if spec.style == "gpt2_digits":
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(
                    add_prefix_space=False, trim_offsets=False, use_regex=True
                ),
            ]
        )
    if spec.style == "llama3":
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(
                    add_prefix_space=False, trim_offsets=False, use_regex=False
                ),
            ]
        )
    raise ValueError(
        f"PreTokenizerSpec.style must be gpt2, gpt2_digits or llama3, got {spec.style!r}"
    )
