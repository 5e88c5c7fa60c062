"""Models by name: TransformerLens's aliases and Hugging Face repo ids, through ``huggingface_hub``.

A name that is not an existing path resolves in this order:

1. An alias, case-insensitive (``"gpt2-small"``, ``"pythia-70m"``, ``"qwen2-0.5b"``,
   ``"gemma-2-2b"``: the names TransformerLens accepts for the supported families), or a repo id
   of the alias table in any case, gives its repo id (``"EleutherAI/pythia-70m"``). Any other
   ``"org/name"`` is taken as a repo id as given; any other bare name is refused.
2. The local Hugging Face cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, read at each call): a
   snapshot of the repo's main branch with ``config.json`` and complete safetensors weights is
   used as it is, without any network access.
3. Offline (``HF_HUB_OFFLINE=1``), nothing else is tried: a repo missing from the cache, or
   cached without config or weights, is refused.
4. Online: the repo's file list and ``config.json`` come first; an architecture kvlens does not
   support (``model_type``), or a repo whose weights are only pickle files
   (``pytorch_model.bin``), is refused before any weight is downloaded. Then the config, the
   safetensors weights (the files the index names, else ``model.safetensors``) and the tokenizer
   files of that one commit are downloaded into the cache.

The result is a local checkpoint folder, loaded like any other.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvlens.loading.hf import _ARCHITECTURES

if TYPE_CHECKING:
    from collections.abc import Iterator

# HF ``model_type`` values kvlens converts.
SUPPORTED_MODEL_TYPES = tuple(_ARCHITECTURES)

INDEX_FILE = "model.safetensors.index.json"
# Files besides the weights that a checkpoint folder needs (those the repo has are downloaded).
EXTRA_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _alias_table() -> dict[str, str]:
    """Lower-cased alias or repo id -> repo id, for the supported families."""
    table: dict[str, list[str]] = {
        "gpt2": ["gpt2-small"],
        "gpt2-medium": [],
        "gpt2-large": [],
        "gpt2-xl": [],
        "distilgpt2": ["distil-gpt2", "distillgpt2", "distill-gpt2", "gpt2-xs"],
        "meta-llama/Llama-2-7b-hf": ["llama-2-7b"],
        "meta-llama/Llama-2-7b-chat-hf": ["llama-2-7b-chat"],
        "meta-llama/Llama-2-13b-hf": ["llama-2-13b"],
        "meta-llama/Llama-2-13b-chat-hf": ["llama-2-13b-chat"],
        "meta-llama/Llama-2-70b-chat-hf": ["llama-2-70b-chat", "meta-llama-2-70b-chat-hf"],
        "mistralai/Mistral-7B-v0.1": ["mistral-7b"],
        "mistralai/Mistral-7B-Instruct-v0.1": ["mistral-7b-instruct"],
        "mistralai/Mistral-Nemo-Base-2407": ["mistral-nemo-base-2407"],
    }
    # Pythia: every size, deduplicated and v0 variants, and the sizes' earlier names.
    old_names = {"70m": "19m", "160m": "125m", "410m": "350m", "1b": "800m", "1.4b": "1.3b"}
    old_names |= {"2.8b": "2.7b", "6.9b": "6.7b", "12b": "13b"}
    for size in ("14m", "31m", "70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b"):
        variants = [""] if size in ("14m", "31m") else ["", "-deduped", "-v0", "-deduped-v0"]
        for variant in variants:
            names = [f"pythia-{size}{variant}"]
            if size in old_names and not variant.endswith("v0"):
                old = f"pythia-{old_names[size]}{variant}"
                names += [old, f"EleutherAI/{old}"]
            table[f"EleutherAI/pythia-{size}{variant}"] = names
    table["EleutherAI/pythia-70m"].append("pythia")
    # Qwen 1.5, 2 and 2.5 (all ``model_type`` qwen2), base and chat or instruct.
    qwen = {
        "Qwen1.5": ("0.5B", "1.8B", "4B", "7B", "14B"),
        "Qwen2": ("0.5B", "1.5B", "7B"),
        "Qwen2.5": ("0.5B", "1.5B", "3B", "7B", "14B", "32B", "72B"),
    }
    for series, sizes in qwen.items():
        tuned = "-Chat" if series == "Qwen1.5" else "-Instruct"
        for size in sizes:
            for suffix in ("", tuned):
                table[f"Qwen/{series}-{size}{suffix}"] = [f"{series}-{size}{suffix}"]
    for size in ("2b", "9b", "27b"):
        for suffix in ("", "-it"):
            table[f"google/gemma-2-{size}{suffix}"] = [f"gemma-2-{size}{suffix}"]
    aliases = {}
    for repo_id, names in table.items():
        for name in (repo_id, *names):
            aliases[name.lower()] = repo_id
    return aliases


ALIASES = _alias_table()


def repo_id_for(name: str) -> str | None:
    """The repo id ``name`` stands for: an alias's, a known repo id's canonical spelling, or
    ``name`` itself when it has the form ``org/name``; ``None`` for any other name."""
    key = name.strip()
    if key.lower() in ALIASES:
        return ALIASES[key.lower()]
    return key if _REPO_ID.match(key) else None


def unknown_name_message(name: str, default_model: str | None = None) -> str:
    """Why ``name`` names no model, and the ways to name one."""
    examples = ", ".join(f"{a!r}" for a in ("gpt2-small", "pythia-70m", "qwen2-0.5b", "gemma-2-2b"))
    default = f"{default_model!r} (the default model), " if default_model else ""
    return (
        f"unknown model {name!r}; give {default}the path of a Hugging Face checkpoint folder or "
        f"of a .gguf file, a Hugging Face repo id ('org/name') of a supported family "
        f"({', '.join(SUPPORTED_MODEL_TYPES)}), or an alias such as {examples} "
        f"(kvlens.loading.hub.ALIASES lists them all)"
    )


# Environment --------------------------------------------------------------------------------


def _env_true(value: str | None) -> bool:
    return value is not None and value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) forbids network access now.

    Read from the environment at each call (``huggingface_hub`` reads it once, at import).
    """
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    if any(n in os.environ for n in names):
        return any(_env_true(os.environ.get(n)) for n in names)
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> Path:
    """The Hugging Face cache folder as the environment gives it now (the same rules as
    ``huggingface_hub``, which reads them once, at import)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.environ[var])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


# Resolution ---------------------------------------------------------------------------------


def checkpoint_folder(repo_id: str, progress: bool = True) -> Path:
    """A local folder holding ``repo_id``'s config, safetensors weights and tokenizer files.

    Args:
        repo_id: A Hugging Face model repo id (``"EleutherAI/pythia-70m"``).
        progress: Show ``huggingface_hub``'s progress bars while downloading.

    Raises:
        FileNotFoundError: Offline, and the repo is not (completely) in the cache.
        ValueError: No such repo, an unsupported architecture, or weights only in pickle files.
        ConnectionError: The Hub could not be reached.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache_dir = hub_cache_dir()
    try:
        folder: Path | None = Path(
            snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True)
        )
    except LocalEntryNotFoundError:
        folder = None
    if folder is not None:
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        if "config.json" in files:
            check_model_type(repo_id, json.loads((folder / "config.json").read_text()))
        missing = _missing(folder, files)
        if not missing:
            return folder
        if hub_offline():
            _check_weights(repo_id, files, require=False)  # a pickle-only snapshot says so
            raise FileNotFoundError(
                f"the cached snapshot of Hugging Face repo {repo_id!r} ({folder}) lacks "
                f"{missing}, and HF_HUB_OFFLINE is set, so nothing is downloaded; unset "
                "HF_HUB_OFFLINE (with network access) to complete it"
            )
    elif hub_offline():
        raise FileNotFoundError(
            f"Hugging Face repo {repo_id!r} is not in the local cache ({cache_dir}) and "
            "HF_HUB_OFFLINE is set, so it is not downloaded; unset HF_HUB_OFFLINE (with network "
            f"access), download it beforehand (`hf download {repo_id}`), or give a local path"
        )
    return _download(repo_id, cache_dir, progress)


def check_model_type(repo_id: str, config: dict[str, Any]) -> None:
    """Refuse a config whose ``model_type`` kvlens cannot convert."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{repo_id!r} is a {model_type!r} model (config.json's model_type); kvlens supports "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def weight_files(files: list[str], index: dict[str, Any] | None) -> list[str]:
    """The safetensors files a checkpoint loads: those its index names, else ``model.safetensors``,
    else every top-level ``*.safetensors`` file."""
    if index is not None:
        return sorted(set(index["weight_map"].values()))
    if "model.safetensors" in files:
        return ["model.safetensors"]
    return [f for f in files if f.endswith(".safetensors") and "/" not in f]


def _missing(folder: Path, files: list[str]) -> list[str]:
    """What a cached snapshot lacks before it can be loaded (config or weights)."""
    missing = [] if "config.json" in files else ["config.json"]
    index = json.loads((folder / INDEX_FILE).read_text()) if INDEX_FILE in files else None
    weights = weight_files(files, index)
    if not weights:
        return [*missing, "*.safetensors weights"]
    return missing + [w for w in weights if w not in files]


def _check_weights(repo_id: str, files: list[str], require: bool = True) -> None:
    """Refuse a repo whose weights are only pickle files, or (``require``) that has no weights."""
    if any(f.endswith(".safetensors") and "/" not in f for f in files):
        return
    pickled = [f for f in files if f.endswith(_PICKLE_SUFFIXES)]
    if pickled:
        raise ValueError(
            f"Hugging Face repo {repo_id!r} has weights only in pickle files ({pickled[:3]}); "
            "kvlens loads safetensors only, since unpickling can run arbitrary code. Convert them "
            "(load with transformers and call save_pretrained(folder, safe_serialization=True), "
            "then give that folder), or use a revision of the repo with *.safetensors files"
        )
    if require:
        raise ValueError(f"Hugging Face repo {repo_id!r} has no *.safetensors weights")


def _download(repo_id: str, cache_dir: Path, progress: bool) -> Path:
    """Download what a checkpoint folder needs, checking architecture and format first."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    with _hub_errors(repo_id):
        info = HfApi().model_info(repo_id)
        files = [s.rfilename for s in info.siblings or []]
        revision = info.sha
        if "config.json" not in files:
            raise ValueError(f"Hugging Face repo {repo_id!r} has no config.json")
        config = hf_hub_download(repo_id, "config.json", revision=revision, cache_dir=cache_dir)
        check_model_type(repo_id, json.loads(Path(config).read_text()))
        _check_weights(repo_id, files)
        index = None
        if INDEX_FILE in files:
            index_path = hf_hub_download(
                repo_id, INDEX_FILE, revision=revision, cache_dir=cache_dir
            )
            index = json.loads(Path(index_path).read_text())
        wanted = [f for f in (*EXTRA_FILES, INDEX_FILE) if f in files]
        wanted += weight_files(files, index)
        with _progress_bars(progress):
            folder = snapshot_download(
                repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=wanted
            )
    return Path(folder)


@contextmanager
def _hub_errors(repo_id: str) -> Iterator[None]:
    """Turn ``huggingface_hub``'s errors into ones that say what to do."""
    import requests
    from huggingface_hub.errors import GatedRepoError, OfflineModeIsEnabled, RepositoryNotFoundError

    try:
        yield
    except OfflineModeIsEnabled as e:  # HF_HUB_OFFLINE was set when huggingface_hub was imported
        raise FileNotFoundError(
            f"Hugging Face repo {repo_id!r} is not (completely) in the local cache and "
            "huggingface_hub was imported with HF_HUB_OFFLINE set, so it is not downloaded"
        ) from e
    except GatedRepoError as e:
        raise ValueError(
            f"Hugging Face repo {repo_id!r} is gated: accept its terms on huggingface.co and log "
            "in (`hf auth login` or HF_TOKEN)"
        ) from e
    except RepositoryNotFoundError as e:
        raise ValueError(
            f"no Hugging Face repo {repo_id!r} (or it is private: log in with `hf auth login`); "
            + unknown_name_message(repo_id).removeprefix(f"unknown model {repo_id!r}; ")
        ) from e
    except (requests.ConnectionError, requests.Timeout) as e:
        raise ConnectionError(
            f"could not reach the Hugging Face Hub to download {repo_id!r} ({e}); check the "
            "network, or set HF_HUB_OFFLINE=1 to use only the local cache"
        ) from e


@contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """``huggingface_hub``'s own progress bars, turned off for the download when not wanted."""
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    if enabled or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()
