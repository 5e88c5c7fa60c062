"""Tests for kvlens.loading.tokenizer on a tiny byte-level BPE vocabulary."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from tokenizers.pre_tokenizers import ByteLevel

from kvlens.loading.tokenizer import tokenizer_from_gguf

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ALPHABET = sorted(ByteLevel.alphabet())
MERGES = ["Ġ 1", "1 2", "h i", "Ġ hi", "Ġ Ġ"]
MERGED = ["Ġ1", "12", "hi", "Ġhi", "ĠĠ"]
TOKENS = [*SPECIALS, *ALPHABET, *MERGED, "<tool>"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def fields(**overrides: Any) -> dict[str, Any]:
    """GGUF tokenizer fields for the tiny vocabulary; an override of None removes the key."""
    base: dict[str, Any] = {
        "general.architecture": "llama",
        "llama.context_length": 64,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": TOKENS,
        "tokenizer.ggml.token_type": [3] * len(SPECIALS) + [1] * (len(TOKENS) - 4) + [4],
        "tokenizer.ggml.merges": MERGES,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.padding_token_id": 2,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": TEMPLATE,
    }
    base.update(overrides)
    return {key: value for key, value in base.items() if value is not None}


def ids(*tokens: str) -> list[int]:
    return [TOKENS.index(token) for token in tokens]


def encode(pre: str | None, text: str) -> list[int]:
    tokenizer = tokenizer_from_gguf(fields(**{"tokenizer.ggml.pre": pre}))
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_smollm_pre_tokenizer_isolates_every_digit() -> None:
    # GPT-2's regex keeps " 12" together (-> Ġ1, 2); smollm splits digits first (-> Ġ, 1, 2).
    assert encode("gpt-2", "hi 12") == ids("hi", "Ġ1", "2")
    assert encode("smollm", "hi 12") == ids("hi", "Ġ", "1", "2")


def test_smollm_keeps_a_whitespace_run_before_digits_whole() -> None:
    assert encode("smollm", "hi  1") == ids("hi", "ĠĠ", "1")
    assert encode("gpt-2", "hi  1") == ids("hi", "Ġ", "Ġ1")


def test_llama3_pre_tokenizer_groups_digits_by_three() -> None:
    assert encode("llama-bpe", "12121") == ids("12", "1", "2", "1")
    assert encode("gpt-2", "12121") == ids("12", "12", "1")


def test_llama3_pre_tokenizer_ignores_merges_for_whole_tokens() -> None:
    tokenizer = tokenizer_from_gguf(fields(**{"tokenizer.ggml.pre": "llama-bpe"}))
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    assert model["ignore_merges"] is True


def test_missing_pre_falls_back_to_gpt2_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert encode(None, "hi 12") == ids("hi", "Ġ1", "2")
    assert "tokenizer.ggml.pre" in caplog.text


def test_unknown_pre_is_rejected_by_name() -> None:
    with pytest.raises(ValueError, match=r"tokenizer.ggml.pre 'mystery'.*supported.*smollm"):
        tokenizer_from_gguf(fields(**{"tokenizer.ggml.pre": "mystery"}))


def test_sentencepiece_vocabulary_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"tokenizer.ggml.model 'llama'.*\['gpt2'\]"):
        tokenizer_from_gguf(fields(**{"tokenizer.ggml.model": "llama"}))


def test_missing_merges_are_reported() -> None:
    with pytest.raises(ValueError, match=r"tokenizer.ggml.merges"):
        tokenizer_from_gguf(fields(**{"tokenizer.ggml.merges": None}))


def test_malformed_merge_is_reported() -> None:
    with pytest.raises(ValueError, match=r"'abc' is not two tokens"):
        tokenizer_from_gguf(fields(**{"tokenizer.ggml.merges": ["abc"]}))


def test_merge_of_unknown_tokens_is_reported() -> None:
    with pytest.raises(ValueError, match=r"merges do not fit tokenizer.ggml.tokens.*Ġq"):
        tokenizer_from_gguf(fields(**{"tokenizer.ggml.merges": ["Ġ q"]}))


def test_out_of_range_token_id_is_reported() -> None:
    with pytest.raises(ValueError, match=r"bos_token_id is 9999, expected an id below"):
        tokenizer_from_gguf(fields(**{"tokenizer.ggml.bos_token_id": 9999}))


def test_bos_is_added_only_when_the_file_asks() -> None:
    plain = tokenizer_from_gguf(fields())
    assert plain("hi")["input_ids"] == ids("hi")
    with_bos = tokenizer_from_gguf(fields(**{"tokenizer.ggml.add_bos_token": True}))
    assert with_bos("hi")["input_ids"] == [1, *ids("hi")]
    assert with_bos("hi", "hi")["input_ids"] == [1, *ids("hi"), 1, *ids("hi")]
    assert with_bos("hi", add_special_tokens=False)["input_ids"] == ids("hi")


def test_eos_is_appended_when_the_file_asks() -> None:
    tokenizer = tokenizer_from_gguf(fields(**{"tokenizer.ggml.add_eos_token": True}))
    assert tokenizer("hi")["input_ids"] == [*ids("hi"), 2]


def test_add_bos_without_a_bos_id_is_reported() -> None:
    broken = fields(**{"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.bos_token_id": None})
    with pytest.raises(ValueError, match=r"add_bos_token is set but tokenizer.ggml.bos_token_id"):
        tokenizer_from_gguf(broken)


def test_control_tokens_are_special_and_user_defined_tokens_are_not() -> None:
    tokenizer = tokenizer_from_gguf(fields())
    text = "<|im_start|>hi<tool><|im_end|>"
    encoded = tokenizer(text)["input_ids"]
    assert encoded == [1, *ids("hi"), TOKENS.index("<tool>"), 2]
    assert tokenizer.decode(encoded) == text
    assert tokenizer.decode(encoded, skip_special_tokens=True) == "hi<tool>"


def test_named_special_tokens_come_from_their_ids() -> None:
    tokenizer = tokenizer_from_gguf(fields())
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert (tokenizer.unk_token, tokenizer.pad_token) == ("<|endoftext|>", "<|im_end|>")


def test_pad_falls_back_to_eos() -> None:
    tokenizer = tokenizer_from_gguf(fields(**{"tokenizer.ggml.padding_token_id": None}))
    assert tokenizer.pad_token == "<|im_end|>"


def test_batches_are_left_padded() -> None:
    batch = tokenizer_from_gguf(fields())(["hi", "hi hi"], padding=True)
    assert batch["input_ids"] == [[2, *ids("hi")], ids("hi", "Ġhi")]
    assert batch["attention_mask"] == [[0, 1], [1, 1]]


@pytest.mark.parametrize("text", ["", " ", "héllo wörld", "🙂 世界", "a\t\n\n  b  ", "x=1;  y=22"])
def test_decode_inverts_encode(text: str) -> None:
    tokenizer = tokenizer_from_gguf(fields())
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_chat_template_and_context_length_come_from_the_file() -> None:
    tokenizer = tokenizer_from_gguf(fields())
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.model_max_length == 64
