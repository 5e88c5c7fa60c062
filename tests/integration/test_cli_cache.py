"""``kvlens generate --save-cache FILE`` and ``--cache FILE``: prefill once, ask later."""

import torch
from tests.integration import test_cli
from tests.integration.test_cli import run

from kvlens import KeyValueCache
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
