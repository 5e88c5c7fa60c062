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
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from kvlens.kernels import build, toolchain

COMPILER = toolchain.compiler()  # $KVLENS_CC (CI runs these tests with clang too), $CC, cc
needs_kernel = pytest.mark.skipif(COMPILER is None, reason="no C compiler on this machine")
OTHER_UID = 12345


@needs_kernel
def test_kernels_build_and_load_where_a_compiler_exists() -> None:
    assert build.available(), build.unavailable_reason()
    assert build.describe().startswith("yes (")


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


def reloaded(monkeypatch) -> str:
    """Load the kernels afresh (restored after the test); what ``kvlens info`` would print."""
    monkeypatch.delitem(build._state, "lib", raising=False)
    return build.describe()


def test_disabled_by_environment(monkeypatch) -> None:
    monkeypatch.setenv("KVLENS_NATIVE", "0")
    assert build.load() is None
    assert reloaded(monkeypatch) == "no, torch does their work: KVLENS_NATIVE=0 turns them off"


@pytest.mark.parametrize(("system", "machine"), [("Darwin", "arm64"), ("Linux", "riscv64")])
def test_other_platforms_use_torch_and_say_why(monkeypatch, system, machine) -> None:
    monkeypatch.setattr(toolchain.platform, "system", lambda: system)
    monkeypatch.setattr(toolchain.platform, "machine", lambda: machine)
    assert reloaded(monkeypatch) == (
        "no, torch does their work: the kernels are built only on Linux x86-64 and aarch64, "
        f"not on {system} {machine}"
    )
    assert not build.available() and build.library() is None


def test_no_compiler_uses_torch_and_says_why(monkeypatch, tmp_path) -> None:
    for name in ("KVLENS_CC", "CC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no cc, no gcc
    assert "no C compiler found (set KVLENS_CC or CC)" in reloaded(monkeypatch)


def fake_compiler(tmp_path: Path, body: str) -> str:
    """A compiler script: ``body`` (sh) runs first, then the real compiler with the arguments."""
    assert COMPILER is not None
    script = tmp_path / "fake-cc"
    script.write_text(f'#!/bin/sh\n{body}\nexec {COMPILER} "$@"\n')
    script.chmod(0o755)
    return str(script)


# Preprocessing (the probe) works, compiling fails.
FAILS_TO_COMPILE = (
    """case " $* " in *" -E "*) ;; *) echo "error: no space left" >&2; exit 1;; esac"""
)


@needs_kernel
def test_a_failing_compiler_falls_back_to_torch(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("KVLENS_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("KVLENS_CC", fake_compiler(tmp_path, FAILS_TO_COMPILE))
    with caplog.at_level(logging.WARNING, logger="kvlens.kernels"):
        assert build.load() is None
    assert "native kernels unavailable" in caplog.text
    assert not list((tmp_path / "kernels").iterdir())  # no half-written build left behind
    assert reloaded(monkeypatch) == (
        "no, torch does their work: they could not be built or loaded (error: no space left)"
    )


def test_a_compiler_that_cannot_target_this_cpu_falls_back_to_torch(monkeypatch) -> None:
    monkeypatch.setenv("KVLENS_CC", shutil.which("false") or "/bin/false")
    assert "cannot compile for this CPU" in reloaded(monkeypatch)


@needs_kernel
def test_kvlens_cc_chooses_the_compiler_and_may_be_a_command_line(tmp_path, monkeypatch) -> None:
    log = tmp_path / "calls"
    wrapper = fake_compiler(tmp_path, f'echo "$*" >> {log}')
    monkeypatch.setenv("KVLENS_CC", f"/bin/sh {wrapper}")  # a command with an argument
    monkeypatch.setenv("CC", shutil.which("false") or "/bin/false")  # KVLENS_CC comes first
    monkeypatch.setenv("KVLENS_CACHE_DIR", str(tmp_path / "cache"))
    assert reloaded(monkeypatch).startswith(f"yes (/bin/sh {wrapper}, ")
    calls = log.read_text().splitlines()
    assert any("-dM -E" in call for call in calls)  # the probe
    assert any("-march=native" in call and "-o" in call for call in calls)  # the build


@needs_kernel
def test_the_build_key_names_the_target_the_compiler_chose() -> None:
    assert COMPILER is not None
    chosen = toolchain.probe(COMPILER)
    macros = subprocess.run(
        [*shlex.split(COMPILER), *chosen.flags, "-dM", "-E", "-x", "c", "-"],
        input="#include <omp.h>\n" if chosen.openmp else "",
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "__OPTIMIZE__" in macros  # the macros of the flags the kernels are built with
    assert chosen.target == build.hashlib.sha256(macros.encode()).hexdigest()
    # Another CPU (other instruction-set macros) or another compiler version: another build.
    for other in ("__AVX512F__ 1", "__VERSION__ 99"):
        assert build.build_key(chosen._replace(target=other)) != build.build_key(chosen)
    assert build.build_key(chosen) == build.build_key(toolchain.probe(COMPILER))


@needs_kernel
def test_a_compiler_without_openmp_builds_single_threaded_kernels(tmp_path, monkeypatch) -> None:
    # As Apple's clang: -fopenmp is refused.
    refuses = """case " $* " in *" -fopenmp "*) echo "error: unsupported option '-fopenmp'" >&2; \
exit 1;; esac"""
    monkeypatch.setenv("KVLENS_CC", fake_compiler(tmp_path, refuses))
    monkeypatch.setenv("KVLENS_CACHE_DIR", str(tmp_path / "cache"))
    described = reloaded(monkeypatch)
    assert described.endswith("single-threaded: the compiler has no OpenMP)")
    lib = build.library()
    assert lib is not None and lib.kvlens_openmp_threads(3) == 1
    assert_kernels_work(lib, monkeypatch, threads=3)


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
    command = [*shlex.split(COMPILER), "-shared", "-fPIC", str(source), "-o", str(library)]
    subprocess.run(command, check=True)
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
    env = {**os.environ, "KVLENS_CACHE_DIR": str(cache_root), "KVLENS_CC": str(COMPILER)}
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


def assert_kernels_work(lib, monkeypatch, threads: int = 1) -> None:
    """The loaded library computes what torch computes."""
    from kvlens import kernels

    monkeypatch.setitem(build._state, "lib", lib)
    x, w = torch.randn(3, 576), torch.randn(576, 960)  # over the one-thread threshold
    out = kernels.matmul(x, w, threads=threads)
    assert out is not None and torch.allclose(out, x @ w, atol=1e-3)


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


# Read-only caches, interrupted builds, a second OpenMP runtime --------------------------------


def refuse_writes(directory: Path, monkeypatch) -> None:
    """Make ``directory`` read-only: really (mode 0500), and for root through ``mkstemp``."""
    directory.chmod(0o500)
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, **kwargs):  # type: ignore[no-untyped-def]
        if Path(kwargs.get("dir") or ".") == directory:
            raise PermissionError(13, "Read-only file system", str(directory))
        return real_mkstemp(*args, **kwargs)

    if os.geteuid() == 0:  # root writes through mode bits
        monkeypatch.setattr(build.tempfile, "mkstemp", mkstemp)


def test_a_read_only_cache_builds_in_a_private_directory(
    tmp_path, monkeypatch, caplog, loaded, scratch
) -> None:
    directory = tmp_path / "kernels"
    directory.mkdir(mode=0o700)
    refuse_writes(directory, monkeypatch)
    monkeypatch.setenv("KVLENS_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("KVLENS_CC", str(COMPILER))
    monkeypatch.delenv("KVLENS_NATIVE", raising=False)
    try:
        with caplog.at_level(logging.WARNING, logger="kvlens.kernels"):
            lib = build.load()
    finally:
        directory.chmod(0o700)
    assert lib is not None
    assert "cannot be written" in caplog.text and "private temporary directory" in caplog.text
    assert list(directory.iterdir()) == []
    assert loaded and all(path.startswith(str(scratch)) for path, _ in loaded)
    assert list(scratch.iterdir()) == []  # the temporary build is removed once loaded
    assert_kernels_work(lib, monkeypatch)


def test_a_read_only_cache_with_a_build_is_used(
    template, tmp_path, monkeypatch, caplog, loaded
) -> None:
    planted = plant(template, tmp_path)
    refuse_writes(planted.parent, monkeypatch)
    monkeypatch.setenv("KVLENS_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("KVLENS_CC", str(COMPILER))
    monkeypatch.delenv("KVLENS_NATIVE", raising=False)
    try:
        with caplog.at_level(logging.INFO, logger="kvlens.kernels"):
            lib = build.load()
    finally:
        planted.parent.chmod(0o700)
    assert lib is not None and "compiling" not in caplog.text and "WARNING" not in caplog.text
    assert [inode for _, inode in loaded] == [planted.stat().st_ino]


SLOW_COMPILER = """case " $* " in *" -E "*) ;; *) sleep 60;; esac"""


@needs_kernel
def test_a_killed_compile_leaves_nothing_the_next_build_keeps(tmp_path) -> None:
    slow = fake_compiler(tmp_path, SLOW_COMPILER)
    env = {**os.environ, "KVLENS_CACHE_DIR": str(tmp_path), "KVLENS_CC": slow}
    env.pop("KVLENS_NATIVE", None)
    process = subprocess.Popen(
        [sys.executable, "-c", "from kvlens.kernels import build; build.library()"],
        env=env,
        start_new_session=True,  # its own process group: the compiler dies with it
    )
    directory = tmp_path / "kernels"
    deadline = time.monotonic() + 120
    while not list(directory.glob("*.tmp")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # mid-compile: its finally never runs
    process.wait()
    left = sorted(p.name for p in directory.iterdir())
    assert left and all(name.endswith(".tmp") for name in left)
    library = build.build(str(COMPILER), directory)  # the next build (under the lock) removes them
    assert sorted(p.name for p in directory.iterdir()) == [library.name, library.name + ".sha256"]


@needs_kernel
def test_a_second_openmp_runtime_gets_the_single_threaded_build(
    template, tmp_path, monkeypatch, caplog
) -> None:
    if not toolchain.probe(str(COMPILER)).openmp:
        pytest.skip("this compiler has no OpenMP")
    plant(template, tmp_path)  # the OpenMP build, as a cache holds it
    runtimes = iter([{"torch's"}, {"torch's", "another"}])  # the OpenMP build brings another
    monkeypatch.setattr(build, "_openmp_runtimes", lambda: next(runtimes, {"torch's", "another"}))
    monkeypatch.setenv("KVLENS_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("KVLENS_CC", str(COMPILER))
    monkeypatch.delenv("KVLENS_NATIVE", raising=False)
    with caplog.at_level(logging.WARNING, logger="kvlens.kernels"):
        described = reloaded(monkeypatch)
    assert "links another OpenMP runtime" in caplog.text
    assert described.endswith("single-threaded: the compiler has no OpenMP)")
    lib = build.library()
    assert lib is not None and lib.kvlens_openmp_threads(3) == 1
    assert_kernels_work(lib, monkeypatch, threads=3)
