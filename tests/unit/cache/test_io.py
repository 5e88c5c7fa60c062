"""Tests for ``kvlens.cache.io``: saving a cache and loading it back, refusing bad files."""

from __future__ import annotations

import errno
import json
import os
import stat
import struct
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from tests.unit.cache.test_ops import filled, snapshot, tiny_cfg

from kvlens import KeyValueCache
from kvlens.cache import io


def assert_same_cache(a: KeyValueCache, b: KeyValueCache) -> None:
    assert a.seq_len == b.seq_len and a.batch_size == b.batch_size and a.frozen == b.frozen
    for x, y in zip(snapshot(a), snapshot(b), strict=True):
        assert x.dtype == y.dtype or x.dtype == torch.int32
        assert torch.equal(x.to(y.dtype), y)


@pytest.fixture
def saved(tmp_path):
    cache = filled(pos=5)
    path = tmp_path / "doc.kvcache"
    cache.save(path)
    return cache, path


def test_round_trip(saved):
    cache, path = saved
    loaded = KeyValueCache.load(path, tiny_cfg())
    assert_same_cache(loaded, cache)
    assert loaded.cfg == tiny_cfg()
    assert loaded.capacity == cache.seq_len


def test_round_trip_after_crop_and_select_stores_only_the_committed_part(tmp_path):
    cache = filled(pos=6, capacity=64).select([2, 0]).crop(-2).freeze()
    cache.save(tmp_path / "c")
    loaded = KeyValueCache.load(tmp_path / "c", tiny_cfg())
    assert_same_cache(loaded, cache)
    assert (tmp_path / "c").stat().st_size < cache.nbytes


def test_tokens_are_optional(tmp_path):
    cache = filled()
    cache.tokens = None
    cache.save(tmp_path / "c")
    assert KeyValueCache.load(tmp_path / "c", tiny_cfg()).tokens is None


def test_load_accepts_a_model(saved):
    class Model:
        cfg = tiny_cfg()

    cache, path = saved
    assert_same_cache(KeyValueCache.load(path, Model()), cache)


def test_save_needs_a_config(tmp_path):
    cache = filled()
    cache.cfg = None
    with pytest.raises(ValueError, match=r"cfg=model\.cfg"):
        cache.save(tmp_path / "c")
    cache.save(tmp_path / "c", cfg=tiny_cfg())
    assert (tmp_path / "c").exists()


def test_another_model_is_refused(saved):
    _, path = saved
    other = tiny_cfg().replace(model_name="other", n_ctx=32)
    with pytest.raises(ValueError, match=r"made by model 'custom' \(fingerprint [0-9a-f]+\), not"):
        KeyValueCache.load(path, other)


def rewrite_metadata(path, **changes):
    """Rewrite the file's header with ``changes`` to its metadata, tensors untouched."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"].update(changes)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])


def test_another_format_version_is_refused(saved):
    _, path = saved
    rewrite_metadata(path, format_version="0")
    with pytest.raises(ValueError, match="format version '0'"):
        KeyValueCache.load(path, tiny_cfg())


def test_altered_metadata_fails_the_checksum(saved):
    _, path = saved
    rewrite_metadata(path, frozen="1")
    with pytest.raises(ValueError, match="checksum"):
        KeyValueCache.load(path, tiny_cfg())


def test_flipped_byte_fails_the_checksum(saved):
    _, path = saved
    raw = bytearray(path.read_bytes())
    raw[-7] ^= 0x40
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum"):
        KeyValueCache.load(path, tiny_cfg())


@pytest.mark.parametrize("keep", [0, 5, 100, -1])
def test_truncated_file_is_refused(saved, keep):
    _, path = saved
    raw = path.read_bytes()
    path.write_bytes(raw[:keep] if keep >= 0 else raw[:-1])
    with pytest.raises(ValueError, match="truncated or damaged"):
        KeyValueCache.load(path, tiny_cfg())


def test_a_plain_safetensors_file_is_refused(tmp_path):
    save_file({"x": torch.zeros(2)}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="not a kvlens cache file"):
        KeyValueCache.load(tmp_path / "x.safetensors", tiny_cfg())


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        KeyValueCache.load(tmp_path / "nothing", tiny_cfg())


def test_failed_save_leaves_the_old_file(saved, monkeypatch):
    _, path = saved
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(io, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        filled(pos=2).save(path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_bfloat16_round_trip(tmp_path):
    cfg = tiny_cfg().replace(dtype=torch.bfloat16)
    cache = KeyValueCache.init_cache(cfg, "cpu", batch_size=1)
    for entry in cache.entries:
        new = torch.randn(1, 3, 2, 4, dtype=torch.bfloat16)
        entry.append(new, new)
    cache.append_attention_mask(torch.ones(1, 3, dtype=torch.long))
    cache.save(tmp_path / "c")
    assert_same_cache(KeyValueCache.load(tmp_path / "c", cfg), cache)
    with pytest.raises(ValueError, match="made by model"):
        KeyValueCache.load(tmp_path / "c", tiny_cfg())


def test_a_non_model_is_refused(saved):
    _, path = saved
    with pytest.raises(TypeError, match="ModelConfig"):
        KeyValueCache.load(path, object())


# Failed writes and reads name the user's path, never the temporary file, and leave nothing behind.

ENOSPC_FROM_SAFETENSORS = SafetensorError(
    "Error while serializing: I/O error: No space left on device (os error 28)"
)


def assert_names_only_the_target(error: BaseException, path) -> None:
    assert str(path) in str(error)
    assert ".tmp" not in str(error)


def test_save_into_a_missing_folder_names_the_target(tmp_path):
    path = tmp_path / "no-such-folder" / "doc.kvcache"
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        filled().save(path)
    assert_names_only_the_target(info.value, path)


def test_save_onto_a_directory_is_refused(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError, match="is a directory") as info:
        filled().save(tmp_path / "d")
    assert_names_only_the_target(info.value, tmp_path / "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_save_onto_a_special_file_does_not_replace_it(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file") as info:
        filled().save(fifo)
    assert_names_only_the_target(info.value, fifo)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)  # a rename would have put a file in its place
    assert [p.name for p in tmp_path.iterdir()] == ["pipe"]


def test_a_full_disk_is_an_os_error_naming_the_target(saved, monkeypatch):
    _, path = saved
    before = path.read_bytes()

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise ENOSPC_FROM_SAFETENSORS

    monkeypatch.setattr(io, "save_file", full)
    with pytest.raises(OSError, match="No space left on device") as info:
        filled(pos=2).save(path)
    assert info.value.errno == errno.ENOSPC
    assert_names_only_the_target(info.value, path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # the temporary file is gone


def test_an_unwritable_folder_is_a_permission_error_naming_the_target(tmp_path, monkeypatch):
    path = tmp_path / "doc.kvcache"

    def denied(dir=None, prefix=None, suffix=None):
        raise PermissionError(errno.EACCES, "Permission denied", f"{dir}/{prefix}x{suffix}")

    monkeypatch.setattr(io.tempfile, "mkstemp", denied)  # root ignores a read-only folder
    with pytest.raises(PermissionError, match="Permission denied") as info:
        filled().save(path)
    assert_names_only_the_target(info.value, path)


def test_a_failed_rename_leaves_no_temporary_file(saved, monkeypatch):
    _, path = saved

    def failing_replace(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link", src, dst)

    monkeypatch.setattr(io.os, "replace", failing_replace)
    with pytest.raises(OSError, match="cross-device") as info:
        filled(pos=2).save(path)
    assert_names_only_the_target(info.value, path)
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_an_unreadable_file_is_an_os_error_naming_it(saved, monkeypatch):
    _, path = saved
    real_open = os.open

    def guarded(name, flags, *args, **kwargs):
        if Path(name) == path:
            raise PermissionError(errno.EACCES, "Permission denied", str(name))
        return real_open(name, flags, *args, **kwargs)

    monkeypatch.setattr(io.os, "open", guarded)  # root can read a mode-000 file
    with pytest.raises(PermissionError, match=f"cannot read the cache {path}"):
        KeyValueCache.load(path, tiny_cfg())
