"""``kvlens pictures`` and :mod:`kvlens.pictures`: PNGs of the documented size, not blank."""

import struct
import sys

import pytest
import torch
from tests.tiny_models import save_tiny_llama_folder, tiny_llama_with_tokenizer

from kvlens import pictures
from kvlens.cli import main
from kvlens.model import HookedTransformer

PROMPT = "The cat paid $5, not $6"  # "$" pairs: escaped, not mathtext


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A Hugging Face checkpoint folder (config, safetensors, tokenizer) of a tiny random Llama."""
    return save_tiny_llama_folder(tmp_path_factory.mktemp("tiny-llama-pictures"))


def png_size(path):
    """``(width, height)`` from a PNG's IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def assert_not_blank(path):
    """The picture has contrast and more than a handful of colours."""
    from matplotlib.image import imread

    pixels = torch.from_numpy(imread(path))  # [height, width, channels] in [0, 1]
    assert pixels.std() > 0.05, f"{path} is nearly uniform"
    colours = torch.unique(pixels.reshape(-1, pixels.shape[-1]), dim=0)
    assert len(colours) > 20, f"{path} has {len(colours)} colours"


def test_cli_writes_the_pictures_asked_for(tiny_folder, tmp_path, capsys):
    argv = ["pictures", "--prompt", PROMPT, "--model", str(tiny_folder), "--quiet"]
    argv += ["--max-new-tokens", "3", "--layers", "1", "--heads", "3,0", "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out.split()
    names = ["attention_L1_H3", "attention_L1_H0"]  # in the order asked for
    assert out == [str(tmp_path / f"{name}.png") for name in [*names, "logit_lens"]]
    model = HookedTransformer.from_pretrained(str(tiny_folder), progress=False)
    n_tokens = model.generate(
        PROMPT, max_new_tokens=3, do_sample=False, return_type="tokens", verbose=False
    ).shape[1]
    assert n_tokens > len(model.to_tokens(PROMPT)[0])  # the continuation is in the pictures
    for name in names:
        assert png_size(tmp_path / f"{name}.png") == pictures.attention_picture_size(n_tokens)
        assert_not_blank(tmp_path / f"{name}.png")
    lens = tmp_path / "logit_lens.png"
    assert png_size(lens) == pictures.logit_lens_picture_size(3, n_tokens)  # 2 layers + final
    assert_not_blank(lens)


def test_cli_all_heads_of_one_layer(tiny_folder, tmp_path, capsys):
    argv = ["pictures", "--prompt", "Hi", "--model", str(tiny_folder), "--quiet"]
    assert main([*argv, "--layers", "1", "--heads", "all", "--out", str(tmp_path)]) == 0
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == [f"attention_L1_H{h}.png" for h in range(4)] + ["logit_lens.png"]


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (["--layers", "2"], ["--layers", "layer 2", "0..1"]),
        (["--layers", "0,-1"], ["--layers", "layer -1", "0..1"]),
        (["--heads", "4"], ["--heads", "head 4", "0..3"]),
        (["--heads", "one"], ["--heads", "comma-separated", "'one'"]),
        (["--max-new-tokens", "-1"], ["--max-new-tokens", ">= 0"]),
    ],
)
def test_cli_refuses_bad_layers_and_heads(tiny_folder, tmp_path, capsys, options, words):
    argv = ["pictures", "--prompt", "Hi", "--model", str(tiny_folder), "--quiet"]
    assert main([*argv, "--out", str(tmp_path), *options]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert all(w in lines[0] for w in words), lines[0]
    assert captured.out == "" and list(tmp_path.iterdir()) == []  # nothing drawn


def test_sizes_follow_the_documented_formula_and_stop_at_the_cap():
    assert pictures.attention_picture_size(12) == (600, 500)  # 2 + 12/4 inches, + 1 for the bar
    assert pictures.attention_picture_size(1) == (500, 400)  # at least 4 inches
    assert pictures.attention_picture_size(10_000) == (1700, 1600)  # at most 16
    assert pictures.logit_lens_picture_size(3, 12) == (1150, 300)
    assert pictures.logit_lens_picture_size(31, 10) == (1000, 925)
    assert pictures.logit_lens_picture_size(1000, 10_000) == (2400, 1600)


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama_with_tokenizer()


def test_logit_lens_last_row_is_the_models_prediction(tiny):
    tokens = tiny.to_tokens(PROMPT)
    logits, cache = pictures.record_run(tiny, tokens, layers=[1])
    assert set(cache.keys()) == {
        "blocks.0.hook_resid_pre",
        "blocks.1.hook_resid_pre",
        "blocks.1.hook_resid_post",
        "blocks.1.attn.hook_pattern",
    }
    probs, ids, labels = pictures.logit_lens(tiny, cache)
    assert labels == ["0_pre", "1_pre", "final_post"]
    assert probs.shape == ids.shape == (3, tokens.shape[1])
    expected = logits[0].softmax(-1).max(-1)
    assert torch.equal(ids[-1], expected.indices)
    torch.testing.assert_close(probs[-1], expected.values)
    assert not torch.equal(ids[0], ids[-1])  # the rows differ: each layer is read on its own


def test_functions_draw_from_a_recorded_run(tiny, tmp_path):
    tokens = tiny.to_tokens(PROMPT)
    _, cache = pictures.record_run(tiny, tokens, layers=[0])
    n = tokens.shape[1]
    attention = pictures.attention_picture(tiny, tokens, cache, 0, 2, tmp_path / "a.png")
    lens = pictures.logit_lens_picture(tiny, tokens, cache, tmp_path / "lens.png")
    assert png_size(attention) == pictures.attention_picture_size(n)
    assert png_size(lens) == pictures.logit_lens_picture_size(3, n)
    assert_not_blank(attention)
    assert_not_blank(lens)
    with pytest.raises(ValueError, match=r"head 4 is out of range.*0\.\.3"):
        pictures.attention_picture(tiny, tokens, cache, 0, 4, tmp_path / "b.png")
    assert not (tmp_path / "b.png").exists()


def test_without_matplotlib_the_error_names_the_extra(tiny, tmp_path, monkeypatch):
    tokens = tiny.to_tokens("Hi")
    _, cache = pictures.record_run(tiny, tokens, layers=[0])
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails
    with pytest.raises(ImportError, match=r"pip install 'kvlens\[plot\]'"):
        pictures.attention_picture(tiny, tokens, cache, 0, 0, tmp_path / "a.png")


@pytest.mark.slow
def test_default_model_pictures_of_a_prompt_and_four_new_tokens(tmp_path):
    model = HookedTransformer.from_pretrained(progress=False)
    last = model.cfg.n_layers - 1
    paths = pictures.draw_pictures(
        model,
        "The capital of France is",
        tmp_path,
        layers=[0, last],
        heads=[0, 8],
        max_new_tokens=4,
        stop_at_eos=False,
    )
    n = model.to_tokens("The capital of France is").shape[1] + 4
    assert [p.name for p in paths] == [
        "attention_L0_H0.png",
        "attention_L0_H8.png",
        f"attention_L{last}_H0.png",
        f"attention_L{last}_H8.png",
        "logit_lens.png",
    ]
    for path in paths[:-1]:
        assert png_size(path) == pictures.attention_picture_size(n)
        assert_not_blank(path)
    assert png_size(paths[-1]) == pictures.logit_lens_picture_size(model.cfg.n_layers + 1, n)
    assert_not_blank(paths[-1])
