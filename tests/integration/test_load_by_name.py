"""``from_pretrained`` by Hugging Face repo id or TransformerLens alias, from a local Hugging Face
cache of tiny random models; the network is never touched (sockets refuse to connect, and the
online path runs against a fake Hub that copies files from local folders)."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import huggingface_hub
import pytest
import torch
from tests.helpers import make_hf_model, tiny_tokenizer, tokens_for

from kvlens.loading.pretrained import load_pretrained
from kvlens.model import HookedTransformer

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``family -> (hf_model, folder)``: a saved tiny checkpoint per family, made on first use."""
    made: dict[str, tuple[object, Path]] = {}

    def get(family: str) -> tuple[object, Path]:
        if family not in made:
            hf_model = make_hf_model(family)
            folder = tmp_path_factory.mktemp(f"ckpt-{family}")
            hf_model.save_pretrained(folder, safe_serialization=True)
            tiny_tokenizer().save_pretrained(folder)
            made[family] = (hf_model, folder)
        return made[family]

    return get


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache for this test, offline, with sockets that refuse to connect."""

    def no_network(*args, **kwargs):
        raise AssertionError("a test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return cache


def cache_repo(cache: Path, repo_id: str, source: Path | None = None, **files: str | bytes) -> Path:
    """Put a repo snapshot into the cache as ``huggingface_hub`` lays it out: the files under
    ``models--org--name/snapshots/<sha>/``, and ``refs/main`` naming that sha."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / SHA
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)
    if source is not None:
        for f in source.iterdir():
            shutil.copy(f, snapshot / f.name)
    for name, content in files.items():
        path = snapshot / name.replace("__", ".")
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return snapshot


def assert_same_logits(model: HookedTransformer, hf_model) -> None:
    tokens = tokens_for(0, 2, 7)
    with torch.no_grad():
        expected = hf_model(tokens).logits
        got = model(tokens)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("name", "repo_id", "family"),
    [
        ("gpt2", "gpt2", "gpt2"),
        ("gpt2-small", "gpt2", "gpt2"),
        ("GPT2-Small", "gpt2", "gpt2"),
        ("EleutherAI/pythia-70m", "EleutherAI/pythia-70m", "pythia"),
        ("pythia-70m", "EleutherAI/pythia-70m", "pythia"),
        ("Qwen/Qwen2-0.5B", "Qwen/Qwen2-0.5B", "qwen2"),
        ("qwen2-0.5b", "Qwen/Qwen2-0.5B", "qwen2"),
        ("google/gemma-2-2b", "google/gemma-2-2b", "gemma2"),
        ("someone/tiny-llama", "someone/tiny-llama", "llama"),  # any repo of a supported family
    ],
)
def test_a_cached_repo_loads_by_repo_id_or_alias(hub_cache, checkpoints, name, repo_id, family):
    hf_model, folder = checkpoints(family)
    cache_repo(hub_cache, repo_id, folder)
    model = HookedTransformer.from_pretrained_no_processing(name, progress=False)
    assert model.tokenizer is not None
    assert_same_logits(model, hf_model)


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [("bf16", torch.bfloat16), ("float16", torch.float16), ("fp32", torch.float32)],
)
def test_dtype_may_be_given_by_name(hub_cache, checkpoints, dtype, expected):
    _, folder = checkpoints("gpt2")
    cache_repo(hub_cache, "gpt2", folder)
    model = load_pretrained("gpt2", dtype=dtype, progress=False)
    assert model.cfg.dtype == expected
    assert model.W_E.dtype == expected
    assert model(tokens_for(0, 1, 4)).dtype == expected


def test_n_devices_splits_the_blocks_as_the_config_says(hub_cache, checkpoints):
    hf_model, folder = checkpoints("gpt2")
    cache_repo(hub_cache, "gpt2", folder)
    model = HookedTransformer.from_pretrained_no_processing("gpt2", progress=False, n_devices=2)
    assert model.cfg.n_devices == 2  # on CPU every group is the CPU
    assert_same_logits(model, hf_model)
    with pytest.raises(ValueError, match="n_devices"):
        load_pretrained("gpt2", n_devices=0)


def test_an_unknown_dtype_name_is_refused():
    with pytest.raises(ValueError, match=r"'float8'.*bf16"):
        load_pretrained("gpt2", dtype="float8")


def test_a_sharded_checkpoint_loads_and_a_missing_shard_is_named(hub_cache, checkpoints, tmp_path):
    hf_model, _ = checkpoints("gpt2")
    folder = tmp_path / "sharded"
    hf_model.save_pretrained(folder, safe_serialization=True, max_shard_size="20KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1
    snapshot = cache_repo(hub_cache, "someone/sharded-gpt2", folder)
    assert_same_logits(
        HookedTransformer.from_pretrained_no_processing("someone/sharded-gpt2"), hf_model
    )
    (snapshot / shards[1].name).unlink()
    with pytest.raises(FileNotFoundError, match=shards[1].name + ".*HF_HUB_OFFLINE"):
        HookedTransformer.from_pretrained("someone/sharded-gpt2")


def test_a_repo_with_only_pickle_weights_is_refused(hub_cache, checkpoints):
    _, folder = checkpoints("gpt2")
    cache_repo(
        hub_cache,
        "someone/pickled",
        config__json=(folder / "config.json").read_text(),
        pytorch_model__bin=b"not unpickled",
    )
    with pytest.raises(ValueError, match=r"pytorch_model.bin.*safetensors only.*save_pretrained"):
        HookedTransformer.from_pretrained("someone/pickled")


def test_an_uncached_repo_offline_is_refused_naming_hf_hub_offline(hub_cache):
    with pytest.raises(
        FileNotFoundError, match=r"'EleutherAI/pythia-160m' is not in.*HF_HUB_OFFLINE"
    ):
        HookedTransformer.from_pretrained("pythia-160m")


def test_a_cached_config_without_weights_offline_is_refused(hub_cache, checkpoints):
    _, folder = checkpoints("gpt2")
    cache_repo(hub_cache, "gpt2", config__json=(folder / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"lacks \['\*.safetensors weights'\]"):
        HookedTransformer.from_pretrained("gpt2")


def test_an_unsupported_architecture_is_refused_from_its_config(hub_cache):
    cache_repo(
        hub_cache,
        "google-bert/bert-base-uncased",
        config__json=json.dumps({"model_type": "bert"}),
        model__safetensors=b"never read",
    )
    with pytest.raises(ValueError, match=r"'bert' model.*supports gpt2, gpt_neox"):
        HookedTransformer.from_pretrained("google-bert/bert-base-uncased")


@pytest.mark.parametrize("name", ["gpt3-small", "no-such-model"])
def test_an_unknown_name_is_refused_saying_how_to_name_a_model(hub_cache, fake_hub, name):
    with pytest.raises(ValueError, match=r"unknown model.*path.*repo id.*alias"):
        HookedTransformer.from_pretrained(name)
    assert fake_hub.calls == []


@pytest.mark.parametrize("name", ["./no/such/folder", "no/such/folder", "missing.gguf", "/nope"])
def test_a_missing_path_is_refused_as_a_path(hub_cache, name):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HookedTransformer.from_pretrained(name)


def test_an_existing_folder_wins_over_a_repo_id(hub_cache, checkpoints, tmp_path, monkeypatch):
    hf_model, folder = checkpoints("llama")
    shutil.copytree(folder, tmp_path / "org" / "model")
    monkeypatch.chdir(tmp_path)
    assert_same_logits(
        HookedTransformer.from_pretrained_no_processing("org/model", progress=False), hf_model
    )


# Online: a fake Hub -------------------------------------------------------------------------


class FakeHub:
    """Stands in for the Hub: ``repos`` maps a repo id to a local folder of its files (and
    ``extra`` to more file names it lists); downloads copy into the cache and are recorded."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.repos: dict[str, Path] = {}
        self.extra: dict[str, list[str]] = {}
        self.calls: list[tuple[str, ...]] = []

    def files(self, repo_id: str) -> list[str]:
        return sorted(p.name for p in self.repos[repo_id].iterdir()) + self.extra.get(repo_id, [])

    def model_info(self, repo_id: str):
        self.calls.append(("model_info", repo_id))
        if repo_id not in self.repos:
            from huggingface_hub.errors import RepositoryNotFoundError

            raise RepositoryNotFoundError(f"404 {repo_id}")
        siblings = [type("Sibling", (), {"rfilename": f}) for f in self.files(repo_id)]
        return type("Info", (), {"sha": SHA, "siblings": siblings})

    def snapshot(self, repo_id: str, names: list[str]) -> Path:
        snapshot = self.cache / ("models--" + repo_id.replace("/", "--")) / "snapshots" / SHA
        snapshot.mkdir(parents=True, exist_ok=True)
        (snapshot.parents[1] / "refs").mkdir(exist_ok=True)
        (snapshot.parents[1] / "refs" / "main").write_text(SHA)
        for name in names:
            shutil.copy(self.repos[repo_id] / name, snapshot / name)
        return snapshot

    def hf_hub_download(self, repo_id, filename, *, revision, cache_dir):
        assert revision == SHA and Path(cache_dir) == self.cache
        self.calls.append(("file", filename))
        return str(self.snapshot(repo_id, [filename]) / filename)

    def snapshot_download(self, repo_id, *, cache_dir, local_files_only=False, **kwargs):
        if local_files_only:
            return REAL_SNAPSHOT_DOWNLOAD(repo_id, cache_dir=cache_dir, local_files_only=True)
        assert kwargs["revision"] == SHA
        self.calls.append(("snapshot", *kwargs["allow_patterns"]))
        return str(self.snapshot(repo_id, kwargs["allow_patterns"]))


REAL_SNAPSHOT_DOWNLOAD = huggingface_hub.snapshot_download


@pytest.fixture
def fake_hub(hub_cache, monkeypatch):
    """Online mode against a ``FakeHub``."""
    hub = FakeHub(hub_cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: hub)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub.hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.snapshot_download)
    return hub


def test_online_an_uncached_repo_downloads_config_weights_and_tokenizer_only(
    fake_hub, checkpoints, tmp_path
):
    hf_model, folder = checkpoints("pythia")
    repo = tmp_path / "repo"
    shutil.copytree(folder, repo)
    (repo / "pytorch_model.bin").write_bytes(b"never fetched")
    (repo / "README.md").write_text("a model card")
    fake_hub.repos["EleutherAI/pythia-70m"] = repo
    model = HookedTransformer.from_pretrained_no_processing("pythia-70m", progress=False)
    assert_same_logits(model, hf_model)
    assert fake_hub.calls[:2] == [("model_info", "EleutherAI/pythia-70m"), ("file", "config.json")]
    (_, *fetched) = fake_hub.calls[2]
    assert "model.safetensors" in fetched and "tokenizer.json" in fetched
    assert "pytorch_model.bin" not in fetched and "README.md" not in fetched
    # Now cached: loading again asks the Hub nothing.
    fake_hub.calls.clear()
    HookedTransformer.from_pretrained("EleutherAI/pythia-70m", progress=False)
    assert fake_hub.calls == []


def test_online_an_unsupported_architecture_is_refused_before_any_weight(fake_hub, tmp_path):
    repo = tmp_path / "bert"
    repo.mkdir()
    (repo / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (repo / "model.safetensors").write_bytes(b"never fetched")
    fake_hub.repos["google-bert/bert-base-uncased"] = repo
    with pytest.raises(ValueError, match="'bert' model"):
        HookedTransformer.from_pretrained("google-bert/bert-base-uncased")
    assert [c[0] for c in fake_hub.calls] == ["model_info", "file"]


def test_online_a_pickle_only_repo_is_refused_before_any_weight(fake_hub, checkpoints, tmp_path):
    _, folder = checkpoints("gpt2")
    repo = tmp_path / "pickled"
    repo.mkdir()
    shutil.copy(folder / "config.json", repo)
    (repo / "pytorch_model.bin").write_bytes(b"never fetched")
    fake_hub.repos["gpt2"] = repo
    with pytest.raises(ValueError, match="safetensors only"):
        HookedTransformer.from_pretrained("gpt2-small")
    assert [c[0] for c in fake_hub.calls] == ["model_info", "file"]


def test_online_a_missing_repo_is_refused(fake_hub):
    with pytest.raises(ValueError, match="no Hugging Face repo 'someone/missing'"):
        HookedTransformer.from_pretrained("someone/missing")
