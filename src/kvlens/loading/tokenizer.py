"""Build a Hugging Face fast tokenizer from the tokenizer fields of a GGUF file.

Only byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``, as in SmolLM2 and Llama 3)
are supported. The result follows the GGUF file where Hugging Face's own GGUF loader does not:
the pre-tokenizer named by ``tokenizer.ggml.pre`` (SmolLM2 splits every digit), BOS/EOS from
their ids, BOS added only when ``tokenizer.ggml.add_bos_token`` says so, and exact decoding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from kvlens.loading._gguf_pretokenizers import build_pre_tokenizer, spec_for

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

SUPPORTED_TOKENIZER_MODELS = ("gpt2",)

# llama.cpp token types (gguf.TokenType): these are matched whole, before pre-tokenization.
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4


def _required_list(fields: Mapping[str, Any], key: str) -> list[Any]:
    value = fields.get(key)
    if not isinstance(value, list) or not value:
        raise ValueError(f"GGUF file has no {key!r} array, which a BPE tokenizer needs")
    return value


def _token(fields: Mapping[str, Any], key: str, tokens: Sequence[str]) -> str | None:
    """The token string whose id is stored under ``key``, or ``None`` if absent."""
    index = fields.get(key)
    if index is None:
        return None
    if not 0 <= index < len(tokens):
        raise ValueError(
            f"GGUF {key} is {index}, expected an id below the vocab size {len(tokens)}"
        )
    return tokens[index]


def _split_merges(merges: Sequence[str]) -> list[tuple[str, str]]:
    pairs = []
    for merge in merges:
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ValueError(f"GGUF merge {merge!r} is not two tokens separated by one space")
        pairs.append((parts[0], parts[1]))
    return pairs


def _backend(fields: Mapping[str, Any], tokens: list[str]) -> Tokenizer:
    """The ``tokenizers`` BPE model, pre-tokenizer, decoder and added tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders
    from tokenizers.models import BPE

    spec = spec_for(fields.get("tokenizer.ggml.pre"))
    merges = _split_merges(_required_list(fields, "tokenizer.ggml.merges"))
    vocab = {token: index for index, token in enumerate(tokens)}
    try:
        model = BPE(
            vocab,
            merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            ignore_merges=spec.ignore_merges,
        )
    except Exception as error:  # tokenizers raises a bare Exception for inconsistent merges
        raise ValueError(
            f"GGUF tokenizer.ggml.merges do not fit tokenizer.ggml.tokens: {error}"
        ) from error
    backend = Tokenizer(model)
    backend.pre_tokenizer = build_pre_tokenizer(spec)
    backend.decoder = decoders.ByteLevel()
    types = fields.get("tokenizer.ggml.token_type") or []
    special = [tokens[i] for i, kind in enumerate(types) if kind in (_UNKNOWN, _CONTROL)]
    added = [tokens[i] for i, kind in enumerate(types) if kind == _USER_DEFINED]
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in added])
    return backend


def _post_processor(fields: Mapping[str, Any], tokens: list[str]) -> Any:
    """Adds BOS and/or EOS as the GGUF flags ask; otherwise leaves ids unchanged."""
    from tokenizers import processors

    ends: dict[str, tuple[str, int]] = {}
    for which in ("bos", "eos"):
        if not fields.get(f"tokenizer.ggml.add_{which}_token", False):
            continue
        key = f"tokenizer.ggml.{which}_token_id"
        token = _token(fields, key, tokens)
        if token is None:
            raise ValueError(f"GGUF tokenizer.ggml.add_{which}_token is set but {key} is missing")
        ends[which] = (token, int(fields[key]))
    if not ends:
        return processors.ByteLevel(trim_offsets=False)

    def sequence(name: str, type_id: int) -> str:
        parts = [f"${name}:{type_id}"]
        if "bos" in ends:
            parts.insert(0, f"{ends['bos'][0]}:{type_id}")
        if "eos" in ends:
            parts.append(f"{ends['eos'][0]}:{type_id}")
        return " ".join(parts)

    return processors.TemplateProcessing(
        single=sequence("A", 0),
        pair=f"{sequence('A', 0)} {sequence('B', 1)}",
        special_tokens=list(ends.values()),
    )


def tokenizer_from_gguf(fields: Mapping[str, Any]) -> PreTrainedTokenizerFast:
    """A Hugging Face fast tokenizer equivalent to llama.cpp's for these GGUF fields.

    Args:
        fields: GGUF key-value fields as Python values (``tokenizer.ggml.*``,
            ``tokenizer.chat_template``, ``general.architecture``, ``{arch}.context_length``).

    Returns:
        A ``PreTrainedTokenizerFast`` with BOS/EOS/UNK/PAD set (PAD falls back to EOS), left
        padding, the file's chat template, and ``model_max_length`` from the context length.

    Raises:
        ValueError: The tokenizer model or pre-tokenizer is not supported, or a field is missing.
    """
    from transformers import PreTrainedTokenizerFast

    kind = fields.get("tokenizer.ggml.model")
    if kind not in SUPPORTED_TOKENIZER_MODELS:
        raise ValueError(
            f"GGUF tokenizer.ggml.model {kind!r} is not supported; supported: "
            f"{list(SUPPORTED_TOKENIZER_MODELS)} (byte-level BPE)"
        )
    tokens = _required_list(fields, "tokenizer.ggml.tokens")
    backend = _backend(fields, tokens)
    backend.post_processor = _post_processor(fields, tokens)
    eos = _token(fields, "tokenizer.ggml.eos_token_id", tokens)
    named = {
        "bos_token": _token(fields, "tokenizer.ggml.bos_token_id", tokens),
        "eos_token": eos,
        "unk_token": _token(fields, "tokenizer.ggml.unknown_token_id", tokens),
        "pad_token": _token(fields, "tokenizer.ggml.padding_token_id", tokens) or eos,
    }
    extra: dict[str, Any] = {k: v for k, v in named.items() if v is not None}
    context = fields.get(f"{fields.get('general.architecture')}.context_length")
    if context is not None:
        extra["model_max_length"] = int(context)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        chat_template=fields.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
        padding_side="left",
        add_bos_token=bool(fields.get("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(fields.get("tokenizer.ggml.add_eos_token", False)),
        **extra,
    )
