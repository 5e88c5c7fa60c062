"""``kvlens generate --save-cache FILE`` and ``--cache FILE``: prefill once, ask later."""

import errno

import pytest
import torch
from safetensors import SafetensorError
from tests.integration import test_cli
from tests.integration.test_cli import run

from kvlens import KeyValueCache
from kvlens.cache import io as cache_io
from kvlens.model import HookedTransformer

DOC = "The cat sat on the mat. It was a sunny day."
QUESTION = " Where did the cat sit?"

# The tiny checkpoint folder fixture of test_cli, shared.
tiny_folder = test_cli.tiny_folder


def generate(folder, prompt, capsys, *extra):
    argv = ["generate", prompt, "--model", str(folder), "--max-new-tokens", "6", "--quiet"]
    return run([*argv, *extra], capsys)


def test_save_cache_changes_nothing_and_writes_the_file(tiny_folder, capsys, tmp_path):
    path = tmp_path / "doc.kvcache"
    code, plain, _ = generate(tiny_folder, DOC, capsys)
    assert code == 0
    code, saved, _ = generate(tiny_folder, DOC, capsys, "--save-cache", str(path))
    assert code == 0 and saved == plain
    model = HookedTransformer.from_pretrained(str(tiny_folder), progress=False)
    cache = KeyValueCache.load(path, model)
    assert torch.equal(cache.tokens, model.to_tokens(DOC))


def test_cache_continues_a_saved_document(tiny_folder, capsys, tmp_path):
    path = tmp_path / "doc.kvcache"
    argv = ["--save-cache", str(path), "--max-new-tokens", "0"]
    assert generate(tiny_folder, DOC, capsys, *argv)[0] == 0
    code, out, _ = generate(tiny_folder, QUESTION, capsys, "--cache", str(path))
    assert code == 0
    model = HookedTransformer.from_pretrained(str(tiny_folder), progress=False)
    tokens = torch.cat([model.to_tokens(DOC), model.to_tokens(QUESTION, prepend_bos=False)], 1)
    full = model.generate(tokens, max_new_tokens=6, do_sample=False, verbose=False)
    expected = model.tokenizer.decode(full[0, tokens.shape[1] :].tolist())
    assert out == QUESTION + expected + "\n"


def test_cache_of_another_model_is_refused(tiny_folder, capsys, tmp_path):
    path = tmp_path / "doc.kvcache"
    model = HookedTransformer.from_pretrained(str(tiny_folder), progress=False)
    cfg = model.cfg.replace(model_name="other", rotary_base=1.0)
    cache = model.prefill(model.to_tokens(DOC))
    cache.save(path, cfg=cfg)
    code, _, err = generate(tiny_folder, QUESTION, capsys, "--cache", str(path))
    assert code == 2
    assert "made by model 'other'" in err


def assert_one_line_naming(code, out, err, path, *words):
    """Exit 2, nothing on stdout, one line on stderr naming ``path`` (not a temporary file)."""
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert str(path) in lines[0] and ".tmp" not in lines[0], lines[0]
    assert all(w in lines[0] for w in words), lines[0]


def test_save_cache_into_a_missing_folder(tiny_folder, capsys, tmp_path):
    path = tmp_path / "no-such-folder" / "doc.kvcache"
    code, out, err = generate(tiny_folder, DOC, capsys, "--save-cache", str(path))
    assert_one_line_naming(code, out, err, path, "does not exist")


def test_save_cache_onto_a_directory(tiny_folder, capsys, tmp_path):
    code, out, err = generate(tiny_folder, DOC, capsys, "--save-cache", str(tmp_path))
    assert_one_line_naming(code, out, err, tmp_path, "is a directory")


def test_save_cache_to_a_full_disk(tiny_folder, capsys, tmp_path, monkeypatch):
    path = tmp_path / "doc.kvcache"

    def full(tensors, filename, metadata=None):
        raise SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    monkeypatch.setattr(cache_io, "save_file", full)
    code, out, err = generate(tiny_folder, DOC, capsys, "--save-cache", str(path))
    assert_one_line_naming(code, out, err, path, "No space left on device")
    assert list(tmp_path.iterdir()) == []  # no temporary file left


def test_save_cache_to_an_unwritable_folder(tiny_folder, capsys, tmp_path, monkeypatch):
    path = tmp_path / "doc.kvcache"

    def denied(dir=None, prefix=None, suffix=None):
        raise PermissionError(errno.EACCES, "Permission denied", f"{dir}/{prefix}x{suffix}")

    monkeypatch.setattr(cache_io.tempfile, "mkstemp", denied)  # root ignores a read-only folder
    code, out, err = generate(tiny_folder, DOC, capsys, "--save-cache", str(path))
    assert_one_line_naming(code, out, err, path, "Permission denied")


def truncated_cache(folder, path):
    model = HookedTransformer.from_pretrained(str(folder), progress=False)
    model.prefill(model.to_tokens(DOC)).save(path)
    path.write_bytes(path.read_bytes()[:-100])


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda folder, path: None, ["no cache file"]),
        (lambda folder, path: path.mkdir(), ["no cache file"]),
        (lambda folder, path: path.write_bytes(b"\xff" * 1000), ["damaged"]),
        (lambda folder, path: path.write_bytes(b""), ["damaged"]),
        (truncated_cache, ["truncated or damaged"]),
    ],
    ids=["missing", "directory", "garbage", "empty", "truncated"],
)
def test_cache_that_cannot_be_read(tiny_folder, capsys, tmp_path, make, words):
    path = tmp_path / "doc.kvcache"
    make(tiny_folder, path)
    code, out, err = generate(tiny_folder, QUESTION, capsys, "--cache", str(path))
    assert_one_line_naming(code, out, err, path, *words)
