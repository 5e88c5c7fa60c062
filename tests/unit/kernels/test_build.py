"""Building, caching and loading the native kernels, and falling back to torch."""

from __future__ import annotations

import logging
import shutil

import pytest

from kvlens.kernels import build

HAS_COMPILER = shutil.which("cc") is not None or shutil.which("gcc") is not None
needs_kernel = pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler on this machine")


@needs_kernel
def test_kernels_build_and_load_where_a_compiler_exists() -> None:
    assert build.available()


@needs_kernel
def test_build_is_cached_per_source(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("KVLENS_CACHE_DIR", str(tmp_path))
    compiler = shutil.which("cc") or shutil.which("gcc")
    assert compiler is not None
    first = build.build(compiler)
    assert first.parent == tmp_path / "kernels" and first.exists()
    stamp = first.stat().st_mtime_ns
    assert build.build(compiler) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary file left


def test_disabled_by_environment(monkeypatch) -> None:
    monkeypatch.setenv("KVLENS_NATIVE", "0")
    assert build.load() is None


def test_a_failing_compiler_falls_back_to_torch(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("KVLENS_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", shutil.which("false") or "/bin/false")
    with caplog.at_level(logging.WARNING, logger="kvlens.kernels"):
        assert build.load() is None
    assert "native kernels unavailable" in caplog.text
    assert not list((tmp_path / "kernels").iterdir())  # no half-written build left behind
