"""Names to repo ids, and the Hugging Face environment read at call time."""

from pathlib import Path

import pytest
import torch

from kvlens.loading.hub import (
    ALIASES,
    SUPPORTED_MODEL_TYPES,
    hub_cache_dir,
    hub_offline,
    repo_id_for,
)
from kvlens.loading.pretrained import parse_dtype


@pytest.mark.parametrize(
    ("name", "repo_id"),
    [
        ("gpt2", "gpt2"),
        ("gpt2-small", "gpt2"),
        ("GPT2-Medium", "gpt2-medium"),
        ("distil-gpt2", "distilgpt2"),
        ("pythia", "EleutherAI/pythia-70m"),
        ("pythia-70m", "EleutherAI/pythia-70m"),
        ("pythia-2.8b-deduped", "EleutherAI/pythia-2.8b-deduped"),
        ("pythia-19m", "EleutherAI/pythia-70m"),  # EleutherAI's earlier name
        ("EleutherAI/pythia-125m-deduped", "EleutherAI/pythia-160m-deduped"),
        ("pythia-1b-v0", "EleutherAI/pythia-1b-v0"),
        ("eleutherai/PYTHIA-410M", "EleutherAI/pythia-410m"),
        ("qwen2-0.5b", "Qwen/Qwen2-0.5B"),
        ("qwen/qwen2-0.5b-instruct", "Qwen/Qwen2-0.5B-Instruct"),
        ("qwen1.5-1.8b-chat", "Qwen/Qwen1.5-1.8B-Chat"),
        ("qwen2.5-3b", "Qwen/Qwen2.5-3B"),
        ("gemma-2-2b", "google/gemma-2-2b"),
        ("gemma-2-9b-it", "google/gemma-2-9b-it"),
        ("llama-2-7b", "meta-llama/Llama-2-7b-hf"),
        ("mistral-7b", "mistralai/Mistral-7B-v0.1"),
        (" someone/My-Model ", "someone/My-Model"),  # any other repo id, as given
    ],
)
def test_names_resolve_to_repo_ids(name, repo_id):
    assert repo_id_for(name) == repo_id


@pytest.mark.parametrize("name", ["gpt3", "pythia-5m", "gemma-2b", "a/b/c", "", "/abs"])
def test_other_names_are_no_repo_id(name):
    assert repo_id_for(name) is None


def test_every_alias_is_lower_case_and_names_a_repo_id():
    assert all(key == key.lower() for key in ALIASES)
    assert all(repo_id_for(repo_id) == repo_id for repo_id in ALIASES.values())
    assert "gpt_neox" in SUPPORTED_MODEL_TYPES


def test_the_environment_is_read_at_each_call(monkeypatch, tmp_path):
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not hub_offline()
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "yes")
    assert hub_offline()
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert hub_cache_dir() == tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert hub_cache_dir() == Path(tmp_path / "elsewhere")


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("float16", torch.float16),
        ("FP16", torch.float16),
        ("bfloat16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("torch.bfloat16", torch.bfloat16),
        ("float64", torch.float64),
        (torch.float16, torch.float16),
    ],
)
def test_parse_dtype(name, dtype):
    assert parse_dtype(name) is dtype


def test_parse_dtype_refuses_other_names():
    with pytest.raises(ValueError, match="'int8' is not a dtype name"):
        parse_dtype("int8")
