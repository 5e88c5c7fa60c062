"""The kvlens command: generate, chat and info on a tiny checkpoint folder; clear errors."""

import io

import pytest
import torch
from tests.tiny_models import smollm2_tokenizer

from kvlens.cli import main


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A Hugging Face checkpoint folder (config, safetensors, tokenizer) of a tiny random Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = smollm2_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def run(argv, capsys, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_streams_the_prompt_and_its_continuation(tiny_folder, capsys):
    code, out, _ = run(
        [
            "generate",
            "Hello world",
            "--model",
            str(tiny_folder),
            "--max-new-tokens",
            "5",
            "--quiet",
        ],
        capsys,
    )
    assert code == 0
    assert out.startswith("Hello world")
    assert len(out.strip()) > len("Hello world")


def test_generate_with_seed_is_reproducible(tiny_folder, capsys):
    argv = [
        "generate",
        "Hi",
        "--model",
        str(tiny_folder),
        "--max-new-tokens",
        "6",
        "--quiet",
        "--temperature",
        "1.0",
        "--seed",
        "11",
    ]
    _, first, _ = run(argv, capsys)
    _, second, _ = run(argv, capsys)
    assert first == second


def test_generate_chat_wraps_the_prompt_in_the_template(tiny_folder, capsys):
    code, out, _ = run(
        [
            "generate",
            "Hi",
            "--chat",
            "--model",
            str(tiny_folder),
            "--max-new-tokens",
            "3",
            "--quiet",
        ],
        capsys,
    )
    assert code == 0
    assert "<|im_start|>" not in out  # the template is fed, not echoed


def test_chat_reads_turns_and_knows_reset_and_exit(tiny_folder, capsys, monkeypatch):
    code, out, err = run(
        ["chat", "--model", str(tiny_folder), "--max-new-tokens", "3", "--quiet"],
        capsys,
        stdin="hello\n/reset\nagain\n/exit\nnever read\n",
        monkeypatch=monkeypatch,
    )
    assert code == 0
    assert "(conversation reset)" in err
    assert out.count("\n") == 2  # two answers, one line each


def test_info_prints_config_and_cache_bytes_per_token(tiny_folder, capsys):
    code, out, _ = run(["info", "--model", str(tiny_folder), "--quiet"], capsys)
    assert code == 0
    # 2 layers x (keys + values) x 2 kv heads x d_head 8 x 4 bytes
    assert "kv cache bytes per token: 256" in out
    assert "n_layers: 2" in out
    assert "native decode kernels: " in out


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["generate", "x", "--model", "no-such-model"], ["unknown model", "smollm2-135m-instruct"]),
        (["generate", "x", "--model", "/nonexistent/model.gguf"], ["does not exist"]),
        (["generate", "x", "--top-p", "1.5"], ["--top-p"]),
        (["generate", "x", "--top-p", "0"], ["--top-p"]),
        (["generate", "x", "--temperature", "-1"], ["--temperature"]),
        (["generate", "x", "--max-new-tokens", "-2"], ["--max-new-tokens"]),
        (["generate", ""], ["empty"]),
    ],
)
def test_bad_input_is_one_line_on_stderr_and_exit_2(argv, words, capsys):
    code, _, err = run(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert all(w in lines[0] for w in words), lines[0]


def test_prompt_longer_than_the_context_is_refused(tiny_folder, capsys):
    code, _, err = run(["generate", "word " * 400, "--model", str(tiny_folder), "--quiet"], capsys)
    assert code == 2
    assert "n_ctx" in err and len(err.strip().splitlines()) == 1


def test_gguf_of_an_unsupported_architecture_is_refused(tmp_path, capsys):
    import gguf
    import numpy as np

    path = tmp_path / "bert.gguf"
    writer = gguf.GGUFWriter(str(path), "bert")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    code, _, err = run(["info", "--model", str(path), "--quiet"], capsys)
    assert code == 2
    assert "bert" in err and len(err.strip().splitlines()) == 1
