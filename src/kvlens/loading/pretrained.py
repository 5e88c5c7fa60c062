"""``from_pretrained``: the default model, a local checkpoint folder or GGUF file, or a Hugging Face
model by repo id or TransformerLens alias (see ``kvlens.loading.hub``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from kvlens.loading.gguf import default_gguf_path
from kvlens.model_quantization import require_fp32_cpu

if TYPE_CHECKING:
    from kvlens.model import HookedTransformer

DEFAULT_MODEL = "smollm2-135m-instruct"

# Known names: where their weights come from (a function returning a local path).
KNOWN_MODELS = {DEFAULT_MODEL: default_gguf_path}
_ALIASES = {"smollm2-135m-instruct": DEFAULT_MODEL, "smollm2": DEFAULT_MODEL}


def resolve_model_path(name_or_path: str | Path | None, progress: bool = True) -> Path:
    """The local file or folder for a model name or path.

    In this order: ``None`` or the default model's name (its GGUF file); an existing path; a
    path-like name that does not exist is refused; a Hugging Face repo id or a TransformerLens
    alias, resolved through the Hugging Face cache or downloaded (``kvlens.loading.hub``).

    Raises:
        ValueError: Neither a known name, a path, nor a repo id of a supported family.
        FileNotFoundError: A path that does not exist, or a repo missing from the cache offline.
        ModelNotInstalledError: The default model's package is not installed.
    """
    from kvlens.loading import hub

    if name_or_path is None:
        return KNOWN_MODELS[DEFAULT_MODEL]()
    key = str(name_or_path).strip().lower().removeprefix("huggingfacetb/")
    if key in _ALIASES:
        return KNOWN_MODELS[_ALIASES[key]]()
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    text = str(name_or_path)
    if _looks_like_path(name_or_path):
        raise FileNotFoundError(f"model path {text!r} does not exist")
    repo_id = hub.repo_id_for(text)
    if repo_id is None:
        raise ValueError(hub.unknown_name_message(text, default_model=DEFAULT_MODEL))
    return hub.checkpoint_folder(repo_id, progress=progress)


def _looks_like_path(name_or_path: str | Path) -> bool:
    """Whether a name can only be a path (a repo id is ``org/name``, with no file suffix)."""
    text = str(name_or_path)
    return (
        isinstance(name_or_path, Path)
        or text.startswith((".", "~", "/"))
        or "\\" in text
        or text.count("/") > 1
        or text.endswith((".gguf", ".safetensors"))
    )


def load_pretrained(
    name_or_path: str | Path | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | None = None,
    progress: bool = True,
    n_devices: int = 1,
    quantized: bool = False,
) -> HookedTransformer:
    """Build a model from a name, a checkpoint folder or a GGUF file.

    ``name_or_path`` resolves as ``resolve_model_path`` says: ``None`` or
    ``"smollm2-135m-instruct"`` (the default model), an existing Hugging Face checkpoint folder or
    ``.gguf`` file, else a Hugging Face repo id (``"EleutherAI/pythia-70m"``) or a
    TransformerLens alias (``"gpt2-small"``, ``"pythia-70m"``), taken from the local Hugging Face
    cache first and downloaded otherwise (never with ``HF_HUB_OFFLINE=1``); safetensors weights
    only. ``dtype`` is a ``torch.dtype`` or its name (``"float16"``, ``"fp16"``, ``"bf16"``...).
    ``n_devices`` splits the blocks over that many devices from ``device`` on
    (``cfg.n_devices``, see :func:`kvlens.devices.get_device_for_block_index`). With
    ``quantized``, a GGUF file's Q4_0, Q4_1 and Q8_0 matrices stay blocks
    (:func:`_from_gguf_blocks`).
    """
    if isinstance(n_devices, bool) or not isinstance(n_devices, int) or n_devices < 1:
        raise ValueError(f"n_devices must be an int >= 1, got {n_devices!r}")
    dtype = parse_dtype(dtype)
    if quantized:
        require_fp32_cpu(dtype, device, n_devices)
    path = resolve_model_path(name_or_path, progress=progress)
    gguf = _gguf_file(path)
    if quantized:
        if gguf is None:
            raise ValueError(
                f"quantized=True keeps a GGUF file's blocks, and {path} is not a GGUF model; "
                "give quantize='q8_0' to quantize another checkpoint at load"
            )
        return _from_gguf_blocks(gguf)
    if gguf is not None:
        return _from_gguf(gguf, dtype, device, progress, n_devices)
    return _from_hf_folder(path, dtype, device, progress, n_devices)


_DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
    "double": torch.float64,
}


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A ``torch.dtype`` from itself or its name (``"float16"``, ``"fp16"``, ``"bfloat16"``)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in _DTYPE_NAMES:
        raise ValueError(f"dtype {dtype!r} is not a dtype name; known: {sorted(_DTYPE_NAMES)}")
    return _DTYPE_NAMES[key]


def is_gguf_model(name_or_path: str | Path | None, progress: bool = True) -> bool:
    """Whether a model name or path (as :func:`load_pretrained` takes it) is a GGUF file (a
    repo id not in the Hugging Face cache is downloaded to tell, with ``progress`` bars)."""
    return _gguf_file(resolve_model_path(name_or_path, progress=progress)) is not None


def _gguf_file(path: Path) -> Path | None:
    """The GGUF file ``path`` names (itself, or a folder's only ``.gguf`` without a
    ``config.json``), or ``None`` for a Hugging Face checkpoint folder."""
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(
                f"{path} is a file but not a .gguf file; give a .gguf file or a folder"
            )
        return path
    if (path / "config.json").is_file():
        return None
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    raise ValueError(
        f"{path} holds neither a config.json (Hugging Face checkpoint) nor exactly one .gguf file "
        f"(found {len(ggufs)})"
    )


def _from_gguf_blocks(path: Path) -> HookedTransformer:
    """A model holding the file's Q4_0, Q4_1 and Q8_0 matrices as blocks, float32 on the CPU.

    No fp32 copy of a block matrix is made: the model's empty parameters are dropped as the
    blocks take their place, then the dense tensors (norms, matrices of other types) are loaded.
    """
    from kvlens.loading.gguf_blocks import read_quantized_gguf
    from kvlens.loading.hf import config_from_hf
    from kvlens.model import HookedTransformer

    read = read_quantized_gguf(path)
    cfg = config_from_hf(read.hf_config, dtype=torch.float32).replace(
        model_name=str(read.metadata.get("general.name") or path.stem),
        default_prepend_bos=bool(read.metadata.get("tokenizer.ggml.add_bos_token", False)),
    )
    model = HookedTransformer(cfg, tokenizer=read.tokenizer, init_weights=False)
    model.install_blocks_(read.state_dict)
    dense = {k: v for k, v in read.state_dict.items() if isinstance(v, torch.Tensor)}
    result = model.load_state_dict(dense, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_blocks")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path.name}: no weights for {missing}, no place for {result.unexpected_keys}"
        )
    model.dense_file_matrices = tuple(read.dense_matrices)
    return model


def _from_gguf(
    path: Path, dtype: torch.dtype, device: str | None, progress: bool, n_devices: int = 1
) -> HookedTransformer:
    from kvlens.loading.gguf import read_gguf

    gguf = read_gguf(path, dtype=dtype, progress=progress)
    add_bos = bool(gguf.metadata.get("tokenizer.ggml.add_bos_token", False))
    name = str(gguf.metadata.get("general.name") or path.stem)
    return _build(
        gguf.hf_config, gguf.state_dict, gguf.tokenizer, dtype, device, name, add_bos, n_devices
    )


def _from_hf_folder(
    folder: Path, dtype: torch.dtype, device: str | None, progress: bool, n_devices: int = 1
) -> HookedTransformer:
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(folder, local_files_only=True)
    state_dict = load_safetensors_folder(folder, progress)
    tokenizer = _folder_tokenizer(folder)
    add_bos = _adds_bos(tokenizer)
    return _build(hf_config, state_dict, tokenizer, dtype, device, folder.name, add_bos, n_devices)


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
    n_devices: int = 1,
) -> HookedTransformer:
    from kvlens.loading.hf import config_from_hf, convert_hf_state_dict
    from kvlens.model import HookedTransformer

    cfg = config_from_hf(hf_config, dtype=dtype).replace(
        device=device,
        model_name=name,
        default_prepend_bos=default_prepend_bos,
        n_devices=n_devices,
    )
    state = convert_hf_state_dict(cfg, hf_state_dict)
    model = HookedTransformer(cfg, tokenizer=tokenizer, init_weights=False)
    model.load_state_dict(state)
    return model.to(device) if device is not None else model
