"""Saving a cache to a safetensors file and loading it back, checked against the model.

The file holds each layer's committed keys and values (``layers.{i}.keys``/``.values``,
``[batch, pos, kv_head, d_head]``), the attention mask (``attention_mask``, int32) and, when known,
the tokens that produced the cache (``tokens``, int64). Its metadata (strings) holds the format
and its version, the model's config fingerprint and name, the shape facts, and a SHA-256 checksum
over the metadata and every tensor's bytes. ``load_cache`` checks all of it before building a
cache, so a file of another model or format version, or a truncated or altered file, is refused
with a ``ValueError``. Safetensors holds only raw tensors: nothing in the file is executed.

Use: prefill a long document once, save the cache, and answer many questions later, in other
processes (``kvlens generate "question" --cache FILE``).
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from kvlens.cache.cache import MASK_DTYPE, KeyValueCache
from kvlens.cache.entry import KeyValueCacheEntry
from kvlens.config import ModelConfig
from kvlens.devices import get_device_for_block_index

FORMAT = "kvlens.cache"
FORMAT_VERSION = "1"
_CHECKSUM = "checksum_sha256"


def save_cache(
    cache: KeyValueCache, path: str | os.PathLike[str], cfg: ModelConfig | None = None
) -> None:
    """Write ``cache`` to ``path`` (safetensors), replacing any file there only when complete.

    Args:
        cache: The cache; its layers and mask must agree on the length.
        path: Where to write.
        cfg: The config of the model that filled the cache; default ``cache.cfg`` (set by
            ``KeyValueCache.init_cache``).

    Raises:
        ValueError: The cache is inconsistent or there is no config.
        OSError: Writing failed (no folder, no permission, disk full, ``path`` a directory...);
            the message names ``path``, and any file already there is left as it was.
    """
    if any(entry.bound is not None for entry in cache.entries):
        raise ValueError(
            "a bounded cache holds only its sliding windows and cannot be saved; prefill an "
            "unbounded cache (KeyValueCache.init_cache(cfg, ..., bounded=False)) to save one"
        )
    cfg = cfg if cfg is not None else cache.cfg
    if cfg is None:
        raise ValueError(
            "save needs the model's config: this cache was not made by init_cache, "
            "pass cfg=model.cfg"
        )
    seq_len = cache.check_consistent()
    if len(cache.entries) != cfg.n_layers:
        raise ValueError(f"the cache has {len(cache.entries)} layers, cfg has {cfg.n_layers}")
    tensors: dict[str, Tensor] = {}
    for i, entry in enumerate(cache.entries):
        tensors[f"layers.{i}.keys"] = entry.past_keys.detach().contiguous().cpu()
        tensors[f"layers.{i}.values"] = entry.past_values.detach().contiguous().cpu()
    tensors["attention_mask"] = cache.previous_attention_mask.contiguous().cpu()
    tokens = cache.tokens
    if tokens is not None and tuple(tokens.shape) == (cache.batch_size, seq_len):
        tensors["tokens"] = tokens.to(torch.int64).contiguous().cpu()
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config_fingerprint": cfg.fingerprint(),
        "model_name": cfg.model_name,
        "n_layers": str(cfg.n_layers),
        "batch": str(cache.batch_size),
        "seq_len": str(seq_len),
        "dtype": str(cfg.dtype).removeprefix("torch."),
        "frozen": "1" if cache.frozen else "0",
    }
    if cache.weights_fingerprint is not None:
        metadata["weights_fingerprint"] = cache.weights_fingerprint
    metadata[_CHECKSUM] = _checksum(metadata, tensors)
    _write_atomically(tensors, metadata, Path(path))


def _write_atomically(tensors: dict[str, Tensor], metadata: dict[str, str], path: Path) -> None:
    """Write a temporary file beside ``path``, flush it to disk, rename it to ``path``.

    A reader never sees a half-written file, and a failure leaves the old file (if any) and no
    temporary file. Errors name ``path``, not the temporary file.
    """
    _check_target(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        save_file(tensors, tmp, metadata=metadata)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # a full disk may only show here; and a crash must not leave a short file
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, (OSError, SafetensorError)):  # safetensors' own error for I/O too
            raise _save_error(path, e) from e
        raise


def _check_target(path: Path) -> None:
    """Refuse a target that a rename would wrongly replace, or whose folder is missing."""
    where = f"cannot save the cache to {path}"
    if not path.parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, f"{where}: its folder {path.parent} does not exist")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise _save_error(path, e) from e
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, f"{where}: it is a directory")
    if not stat.S_ISREG(mode):
        raise OSError(f"{where}: it is not a regular file (a device or a pipe?)")


def _save_error(path: Path, error: Exception) -> OSError:
    """An ``OSError`` of ``error``'s kind (``PermissionError``...) whose message names ``path``."""
    code = getattr(error, "errno", None)
    reason = getattr(error, "strerror", None) or str(error)
    if code is None:  # safetensors reports an I/O error as "... (os error 28)"
        found = re.search(r"os error (\d+)", str(error))
        code = int(found.group(1)) if found else None
        reason = os.strerror(code) if code is not None else reason
    message = f"cannot save the cache to {path}: {reason}"
    return OSError(message) if code is None else OSError(code, message)


def load_cache(
    path: str | os.PathLike[str], model_or_cfg: Any, device: torch.device | str | None = None
) -> KeyValueCache:
    """Read a cache written by :func:`save_cache` for the model ``model_or_cfg``.

    Args:
        path: The file.
        model_or_cfg: The model that will continue the cache, or its ``ModelConfig``. Given a
            model, a cache filled by a model with other weights is refused (the weights'
            fingerprint is saved with the cache); a config checks the architecture only.
        device: Where the cache goes (each layer on its block's device); default the config's.

    Raises:
        ValueError: The file is not a kvlens cache, has another format version, was made by
            another model, or is truncated or altered (its checksum does not match).
        FileNotFoundError: There is no file at ``path``.
        OSError: The file cannot be read (e.g. no permission).
    """
    cfg = model_or_cfg
    if not isinstance(cfg, ModelConfig):
        cfg = getattr(model_or_cfg, "cfg", None)
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"model_or_cfg must be a model or a ModelConfig, got {type(model_or_cfg)}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no cache file at {path}")
    try:
        os.close(os.open(path, os.O_RDONLY))
    except OSError as e:  # e.g. no permission to read it: say so, not "damaged"
        raise OSError(e.errno, f"cannot read the cache {path}: {e.strerror}") from e
    metadata = _read_metadata(path)
    _check_metadata(metadata, cfg, path)
    try:
        tensors = load_file(path, device="cpu")
    except Exception as e:
        raise ValueError(f"{path} is truncated or damaged: safetensors cannot read it ({e})") from e
    if _checksum(metadata, tensors) != metadata.get(_CHECKSUM):
        raise ValueError(f"{path} is altered or damaged: its checksum does not match its contents")
    _check_weights(metadata, model_or_cfg, path)
    return _build(tensors, metadata, cfg, device, path)


def _check_weights(metadata: dict[str, str], model_or_cfg: Any, path: Path) -> None:
    """Refuse a cache filled by a model with other weights (checked when a model is given)."""
    saved = metadata.get("weights_fingerprint")
    fingerprint = getattr(model_or_cfg, "weights_fingerprint", None)
    if saved is None or not callable(fingerprint):
        return
    own = fingerprint()
    if saved != own:
        raise ValueError(
            f"{path} was filled by another model: its keys and values come from weights with "
            f"fingerprint {saved}, this model's are {own}; prefill a new cache with this model"
        )


def _read_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
    except Exception as e:
        raise ValueError(
            f"{path} is not a readable safetensors file (truncated or damaged?): {e}"
        ) from e
    if not metadata or metadata.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a kvlens cache file (no '{FORMAT}' format in its metadata)"
        )
    return dict(metadata)


def _check_metadata(metadata: dict[str, str], cfg: ModelConfig, path: Path) -> None:
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path} has kvlens cache format version {version!r}; this kvlens reads version "
            f"{FORMAT_VERSION!r}: prefill and save the cache again"
        )
    fingerprint = metadata.get("config_fingerprint")
    if fingerprint != cfg.fingerprint():
        raise ValueError(
            f"this cache was made by model {metadata.get('model_name')!r} (fingerprint "
            f"{fingerprint}), not by {cfg.model_name!r} (fingerprint {cfg.fingerprint()})"
        )
    if _int_field(metadata, "n_layers", path) != cfg.n_layers:
        raise ValueError(
            f"{path} holds {metadata['n_layers']} layers, the model has {cfg.n_layers}"
        )
    for name in ("batch", "seq_len"):
        _int_field(metadata, name, path)


def _int_field(metadata: dict[str, str], name: str, path: Path) -> int:
    try:
        value = int(metadata[name])
    except (KeyError, ValueError):
        raise ValueError(f"{path} has no valid '{name}' in its metadata") from None
    if value < 0:
        raise ValueError(f"{path} has a negative '{name}' in its metadata")
    return value


def _build(
    tensors: dict[str, Tensor],
    metadata: dict[str, str],
    cfg: ModelConfig,
    device: torch.device | str | None,
    path: Path,
) -> KeyValueCache:
    batch, seq_len = int(metadata["batch"]), int(metadata["seq_len"])
    device = device if device is not None else cfg.device
    expected = (batch, seq_len, cfg.n_kv_heads, cfg.d_head)
    entries = []
    for i in range(cfg.n_layers):
        pair = []
        for kind in ("keys", "values"):
            t = tensors.get(f"layers.{i}.{kind}")
            if t is None or tuple(t.shape) != expected or t.dtype != cfg.dtype:
                raise ValueError(
                    f"{path}: layers.{i}.{kind} should be {expected} of {cfg.dtype}, got "
                    f"{None if t is None else (tuple(t.shape), t.dtype)}"
                )
            pair.append(t.to(get_device_for_block_index(i, cfg, device)))
        entries.append(KeyValueCacheEntry(pair[0], pair[1]))
    mask = tensors.get("attention_mask")
    if mask is None or tuple(mask.shape) != (batch, seq_len):
        raise ValueError(f"{path}: attention_mask should be {(batch, seq_len)}")
    cache = KeyValueCache(entries, mask.to(entries[0].device, MASK_DTYPE))
    if metadata.get("frozen") == "1":
        cache.freeze()
    cache.cfg = cfg
    cache.weights_fingerprint = metadata.get("weights_fingerprint")
    tokens = tensors.get("tokens")
    if tokens is not None:
        if tuple(tokens.shape) != (batch, seq_len):
            raise ValueError(f"{path}: tokens should be {(batch, seq_len)}")
        cache.tokens = tokens.to(entries[0].device)
    return cache


def _checksum(metadata: dict[str, str], tensors: dict[str, Tensor]) -> str:
    """SHA-256 over the metadata (but the checksum) and each tensor's name, dtype, shape, bytes."""
    h = hashlib.sha256()
    for key in sorted(metadata):
        if key != _CHECKSUM:
            h.update(f"{key}={metadata[key]}\n".encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(t.view(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()
