"""``from_pretrained``: a known model name, a Hugging Face checkpoint folder, or a GGUF file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from kvlens.loading.gguf import default_gguf_path

if TYPE_CHECKING:
    from kvlens.model import HookedTransformer

DEFAULT_MODEL = "smollm2-135m-instruct"

# Known names: where their weights come from (a function returning a local path).
KNOWN_MODELS = {DEFAULT_MODEL: default_gguf_path}
_ALIASES = {"smollm2-135m-instruct": DEFAULT_MODEL, "smollm2": DEFAULT_MODEL}


def resolve_model_path(name_or_path: str | Path | None) -> Path:
    """The local file or folder for a model name or path.

    Raises:
        ValueError: Neither a known name nor an existing path (the message lists the names).
        ModelNotInstalledError: A known model whose package is not installed.
    """
    if name_or_path is None:
        return KNOWN_MODELS[DEFAULT_MODEL]()
    key = str(name_or_path).strip().lower().removeprefix("huggingfacetb/")
    if key in _ALIASES:
        return KNOWN_MODELS[_ALIASES[key]]()
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    looks_like_path = any(sep in str(name_or_path) for sep in ("/", "\\")) or str(
        name_or_path
    ).endswith((".gguf", ".safetensors"))
    if looks_like_path:
        raise FileNotFoundError(f"model path {str(name_or_path)!r} does not exist")
    raise ValueError(
        f"unknown model {str(name_or_path)!r}; known models: {sorted(KNOWN_MODELS)}, or give the "
        "path of a Hugging Face checkpoint folder or of a .gguf file"
    )


def load_pretrained(
    name_or_path: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
    progress: bool = True,
) -> HookedTransformer:
    """Build a model from a known name, a checkpoint folder or a GGUF file (see ``resolve``)."""
    path = resolve_model_path(name_or_path)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(
                f"{path} is a file but not a .gguf file; give a .gguf file or a folder"
            )
        return _from_gguf(path, dtype, device, progress)
    if (path / "config.json").is_file():
        return _from_hf_folder(path, dtype, device, progress)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _from_gguf(ggufs[0], dtype, device, progress)
    raise ValueError(
        f"{path} holds neither a config.json (Hugging Face checkpoint) nor exactly one .gguf file "
        f"(found {len(ggufs)})"
    )


def _from_gguf(
    path: Path, dtype: torch.dtype, device: str | None, progress: bool
) -> HookedTransformer:
    from kvlens.loading.gguf import read_gguf

    gguf = read_gguf(path, dtype=dtype, progress=progress)
    add_bos = bool(gguf.metadata.get("tokenizer.ggml.add_bos_token", False))
    name = str(gguf.metadata.get("general.name") or path.stem)
    return _build(gguf.hf_config, gguf.state_dict, gguf.tokenizer, dtype, device, name, add_bos)


def _from_hf_folder(
    folder: Path, dtype: torch.dtype, device: str | None, progress: bool
) -> HookedTransformer:
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(folder, local_files_only=True)
    state_dict = load_safetensors_folder(folder, progress)
    tokenizer = _folder_tokenizer(folder)
    add_bos = _adds_bos(tokenizer)
    return _build(hf_config, state_dict, tokenizer, dtype, device, folder.name, add_bos)


def load_safetensors_folder(folder: Path, progress: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's ``*.safetensors`` files (sharded or not); never unpickles."""
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({folder / f for f in weight_map.values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(
            p.name for p in folder.glob("*.pt")
        )
        hint = (
            f" (found {pickled}: pickle files are not loaded, since unpickling can run code; "
            "convert them to safetensors)"
            if pickled
            else ""
        )
        raise FileNotFoundError(f"no *.safetensors weights in {folder}{hint}")
    state: dict[str, torch.Tensor] = {}
    for f in tqdm(files, desc="loading weights", unit="file", disable=not progress):
        if not f.is_file():
            raise FileNotFoundError(f"weight shard {f} (named in {index.name}) is missing")
        state.update(load_file(str(f)))
    return state


def _folder_tokenizer(folder: Path) -> Any:
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if not any((folder / n).is_file() for n in names):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer itself puts BOS in front of plain text."""
    if tokenizer is None or tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def _build(
    hf_config: Any,
    hf_state_dict: dict[str, torch.Tensor],
    tokenizer: Any,
    dtype: torch.dtype,
    device: str | None,
    name: str,
    default_prepend_bos: bool,
) -> HookedTransformer:
    from kvlens.loading.hf import config_from_hf, convert_hf_state_dict
    from kvlens.model import HookedTransformer

    cfg = config_from_hf(hf_config, dtype=dtype).replace(
        device=device, model_name=name, default_prepend_bos=default_prepend_bos
    )
    state = convert_hf_state_dict(cfg, hf_state_dict)
    model = HookedTransformer(cfg, tokenizer=tokenizer, init_weights=False)
    model.load_state_dict(state)
    return model.to(device) if device is not None else model
