"""Building, caching and loading the native kernels, and falling back to torch.

A damaged library in the cache (truncated, zero bytes, garbage, foreign) is rebuilt, never
loaded: a truncated ELF file can pass dlopen and kill the process with SIGBUS later, so those
checks run the loader in a fresh process. A cache directory or library that another user could
have written is not loaded.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from kvlens.kernels import build

COMPILER = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
needs_kernel = pytest.mark.skipif(COMPILER is None, reason="no C compiler on this machine")
OTHER_UID = 12345


@needs_kernel
def test_kernels_build_and_load_where_a_compiler_exists() -> None:
    assert build.available()


@needs_kernel
def test_build_is_cached_per_source(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("KVLENS_CACHE_DIR", str(tmp_path))
    assert COMPILER is not None
    first = build.build(COMPILER)
    assert first.parent == tmp_path / "kernels" and first.exists()
    assert stat.S_IMODE(first.parent.stat().st_mode) == 0o700  # private to this user
    stamp = first.stat().st_mtime_ns
    assert build.build(COMPILER) == first and first.stat().st_mtime_ns == stamp
    # No temporary file left: the library and its manifest only.
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name, first.name + ".sha256"]


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


# A verified build, copied into each test's cache --------------------------------------------


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A verified build of the kernels (library and manifest) in a private directory."""
    if COMPILER is None:
        pytest.skip("no C compiler on this machine")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KVLENS_CACHE_DIR", str(tmp_path_factory.mktemp("template")))
        return build.build(COMPILER)


def plant(template: Path, cache_root: Path) -> Path:
    """Copy the verified build into ``cache_root/kernels`` (mode 0700); the library's path."""
    directory = cache_root / "kernels"
    directory.mkdir(mode=0o700, exist_ok=True)
    for path in template.parent.glob(template.name + "*"):  # the library and its manifest
        shutil.copy2(path, directory / path.name)
    return directory / template.name


def truncate(library: Path, manifest: bool = True) -> None:
    library.write_bytes(library.read_bytes()[: library.stat().st_size // 2])
    if not manifest:  # as a build from before manifests, or one cut short by a crash
        Path(f"{library}.sha256").unlink(missing_ok=True)


def foreign(library: Path) -> None:
    """Put another shared library in its place."""
    source = library.parent / "foreign.c"
    source.write_text("int kvlens_foreign(void) { return 1; }\n")
    assert COMPILER is not None
    subprocess.run([COMPILER, "-shared", "-fPIC", str(source), "-o", str(library)], check=True)
    source.unlink()


DAMAGE = {
    "truncated": truncate,
    "truncated-no-manifest": lambda library: truncate(library, manifest=False),
    "zero-bytes": lambda library: library.write_bytes(b""),
    "garbage": lambda library: library.write_bytes(os.urandom(library.stat().st_size)),
    "foreign": foreign,
}

CHECK = """
import logging, torch
logging.basicConfig(level=logging.INFO, format="%(message)s")
from kvlens import kernels
x, w = torch.randn(3, 64), torch.randn(64, 96)
out = kernels.matmul(x, w)
print("native", kernels.available(), out is not None and torch.allclose(out, x @ w, atol=1e-4))
"""


def fresh_process(cache_root: Path, code: str = CHECK) -> subprocess.Popen[str]:
    """A new Python process loading the kernels from ``cache_root``."""
    env = {**os.environ, "KVLENS_CACHE_DIR": str(cache_root), "CC": str(COMPILER)}
    env.pop("KVLENS_NATIVE", None)
    return subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


# End to end for three kinds (each costs a compile); open_verified is tested on all of them.
@pytest.mark.parametrize("damage", ["truncated-no-manifest", "zero-bytes", "garbage"])
def test_a_damaged_library_is_rebuilt_in_a_fresh_process(template, tmp_path, damage) -> None:
    library = plant(template, tmp_path)
    DAMAGE[damage](library)
    process = fresh_process(tmp_path)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err  # -7 was SIGBUS
    assert out.strip() == "native True True", err
    assert "rebuilding it" in err and "compiling the native kernels" in err
    fd = build.open_verified(library)  # what is there now is a whole, verified build
    assert fd is not None
    os.close(fd)
    assert library.read_bytes() == template.read_bytes()


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_open_verified_refuses_damage(template, tmp_path, damage, caplog) -> None:
    library = plant(template, tmp_path)
    fd = build.open_verified(library)
    assert fd is not None
    os.close(fd)
    DAMAGE[damage](library)
    with caplog.at_level(logging.WARNING, logger="kvlens.kernels"):
        assert build.open_verified(library) is None
    assert str(library) in caplog.text


@needs_kernel
def test_concurrent_first_runs_compile_once(tmp_path) -> None:
    processes = [fresh_process(tmp_path) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], results
    assert [out.strip() for out, _ in results] == ["native True True"] * 2
    assert sum(err.count("compiling the native kernels") for _, err in results) == 1


# Files another user could have written are not loaded ----------------------------------------


@pytest.fixture
def loaded(monkeypatch) -> list[tuple[str, int]]:
    """The real path and inode of every library that ctypes loads during the test."""
    files: list[tuple[str, int]] = []
    real_cdll = ctypes.CDLL

    def spy(name, *args, **kwargs):
        files.append((os.path.realpath(name), os.stat(name).st_ino))
        return real_cdll(name, *args, **kwargs)

    monkeypatch.setattr(build.ctypes, "CDLL", spy)
    return files


@pytest.fixture
def scratch(tmp_path, monkeypatch) -> Path:
    """Where temporary directories go during the test."""
    directory = tmp_path / "scratch"
    directory.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    return directory


def pretend_foreign(path: Path, monkeypatch) -> None:
    """Make ``path`` owned by another user: really as root, else through the owner check."""
    if os.geteuid() == 0:
        os.chown(path, OTHER_UID, -1)
        return
    inode, real_reason = path.stat().st_ino, build.unsafe_reason

    def reason(st: os.stat_result) -> str | None:
        if st.st_ino == inode:
            return f"it is owned by uid {OTHER_UID}, not by this user (uid {os.getuid()})"
        return real_reason(st)

    monkeypatch.setattr(build, "unsafe_reason", reason)


def assert_kernels_work(lib, monkeypatch) -> None:
    """The loaded library computes what torch computes."""
    from kvlens import kernels

    monkeypatch.setitem(build._state, "lib", lib)
    x, w = torch.randn(3, 64), torch.randn(64, 96)
    out = kernels.matmul(x, w)
    assert out is not None and torch.allclose(out, x @ w, atol=1e-4)


@pytest.mark.parametrize("owner", ["world-writable", "another-user"])
def test_an_untrusted_cache_directory_is_not_used(
    template, tmp_path, monkeypatch, caplog, loaded, scratch, owner
) -> None:
    planted = plant(template, tmp_path)  # a valid-looking build another user could have made
    directory = planted.parent
    if owner == "world-writable":
        directory.chmod(0o777)
        expected = "writable by group or others (mode 777)"
    else:
        pretend_foreign(directory, monkeypatch)
        expected = f"owned by uid {OTHER_UID}"
    before = sorted(os.listdir(directory))
    monkeypatch.setenv("KVLENS_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("KVLENS_NATIVE", raising=False)
    monkeypatch.setenv("CC", str(COMPILER))
    with caplog.at_level(logging.WARNING, logger="kvlens.kernels"):
        lib = build.load()
    assert lib is not None  # built in a private temporary directory instead
    assert expected in caplog.text and "private temporary directory" in caplog.text
    assert loaded and all(not path.startswith(str(directory)) for path, _ in loaded)
    assert all(inode != planted.stat().st_ino for _, inode in loaded)
    assert sorted(os.listdir(directory)) == before  # an untrusted directory is not written
    assert list(scratch.iterdir()) == []  # the temporary build is removed once loaded
    assert_kernels_work(lib, monkeypatch)


def test_a_library_owned_by_another_user_is_rebuilt(
    template, tmp_path, monkeypatch, caplog, loaded
) -> None:
    planted = plant(template, tmp_path)
    foreign_inode = planted.stat().st_ino
    pretend_foreign(planted, monkeypatch)
    monkeypatch.setenv("KVLENS_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("KVLENS_NATIVE", raising=False)
    monkeypatch.setenv("CC", str(COMPILER))
    with caplog.at_level(logging.WARNING, logger="kvlens.kernels"):
        lib = build.load()
    assert lib is not None
    assert f"owned by uid {OTHER_UID}" in caplog.text and "rebuilding it" in caplog.text
    assert loaded and all(inode != foreign_inode for _, inode in loaded)
    assert planted.stat().st_uid == os.getuid() and planted.stat().st_ino != foreign_inode
    assert_kernels_work(lib, monkeypatch)


@pytest.mark.parametrize("mode", [0o775, 0o757])
def test_a_group_or_world_writable_library_is_not_trusted(template, tmp_path, mode) -> None:
    planted = plant(template, tmp_path)
    planted.chmod(mode)
    assert build.open_verified(planted) is None
