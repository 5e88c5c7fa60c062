"""The kvlens command: generate, chat and info on a tiny checkpoint folder; clear errors."""

import io
import os
import shutil
import subprocess
import sys

import pytest
from tests.tiny_models import save_tiny_llama_folder

from kvlens.cli import main


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A Hugging Face checkpoint folder (config, safetensors, tokenizer) of a tiny random Llama."""
    return save_tiny_llama_folder(tmp_path_factory.mktemp("tiny-llama"))


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
    if "native decode kernels: yes" in out:
        assert "fused decode layer: 2 of 2 blocks" in out


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


def test_chat_refuses_zero_new_tokens_as_such(tiny_folder, capsys, monkeypatch):
    code, out, err = run(
        ["chat", "--model", str(tiny_folder), "--max-new-tokens", "0", "--quiet"],
        capsys,
        stdin="hello\n",
        monkeypatch=monkeypatch,
    )
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "--max-new-tokens must be >= 1" in lines[0] and "context" not in lines[0]


class ClosedPipe(io.StringIO):
    """A stdout whose reader has gone away."""

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(32, "Broken pipe")


@pytest.mark.parametrize("command", ["generate", "info"])
def test_a_closed_stdout_ends_quietly_in_process(tiny_folder, capsys, monkeypatch, command):
    argv = [command, "--model", str(tiny_folder), "--quiet"]
    if command == "generate":
        argv += ["Hello", "--max-new-tokens", "3"]
    monkeypatch.setattr("sys.stdout", ClosedPipe())
    assert main(argv) == 0
    assert capsys.readouterr().err == ""


def kvlens_process(argv, stdout, **env):
    """Start ``python -m kvlens.cli argv`` without native kernels (no compile in these tests)."""
    environment = {**os.environ, "KVLENS_NATIVE": "0", **env}
    return subprocess.Popen(
        [sys.executable, "-m", "kvlens.cli", *argv],
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=subprocess.PIPE,
        env=environment,
    )


@pytest.mark.parametrize("command", ["generate", "info"])
def test_a_closed_pipe_ends_quietly_with_status_0(tiny_folder, command):
    """``kvlens ... | head -c 0``: the reader is gone before the first write."""
    argv = [command, "--model", str(tiny_folder), "--quiet"]
    if command == "generate":
        argv += ["Hello", "--max-new-tokens", "50"]
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write now fails with EPIPE, as after `head` exits
    try:
        process = kvlens_process(argv, write_end)
    finally:
        os.close(write_end)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err.decode()
    assert err.decode() == ""  # no traceback, no "Exception ignored" at the interpreter's exit


@pytest.mark.skipif(
    not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")), reason="no compiler"
)
def test_info_survives_a_truncated_kernel_library(tiny_folder, tmp_path):
    """A truncated library in the kernel cache killed every run with SIGBUS; now it is rebuilt."""
    from kvlens.kernels import build

    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    assert compiler is not None
    built = build.build(compiler)  # the machine's cached build (compiled if need be)
    kernels = tmp_path / "kernels"
    kernels.mkdir(mode=0o700)
    library = kernels / built.name
    library.write_bytes(built.read_bytes()[: built.stat().st_size // 2])
    process = kvlens_process(
        ["info", "--model", str(tiny_folder), "--quiet"],
        subprocess.PIPE,
        KVLENS_NATIVE="1",
        KVLENS_CACHE_DIR=str(tmp_path),
        CC=compiler,
    )
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err.decode()  # -7 was SIGBUS
    assert "native decode kernels: yes" in out.decode()
    assert "rebuilding it" in err.decode()
