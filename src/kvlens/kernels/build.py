"""Compiling and loading kvlens's C kernels: once per machine, cached, verified, never required.

The sources (``*.c`` and ``kernels.h`` beside this file; C with the vector extensions GCC and
clang share) are compiled with the C compiler (``cc -O3 -march=native -fopenmp``, a few seconds)
into one shared library in ``~/.cache/kvlens/kernels`` (``$KVLENS_CACHE_DIR`` or
``$XDG_CACHE_HOME`` move it), named by a hash of the sources, the compiler, the flags and the
target the compiler chose for this CPU, and loaded with ctypes.

Environment:
    KVLENS_CC: the compiler's command line (``KVLENS_CC="python -m ziglang cc"``); else ``CC``,
        else ``cc`` or ``gcc`` (:mod:`kvlens.kernels.toolchain` says how flags and target are
        chosen).
    KVLENS_CACHE_DIR: where builds are kept (in its ``kernels`` folder).
    KVLENS_NATIVE: ``0`` to use torch only.

OpenMP is optional: a compiler without it builds a single-threaded library. An OpenMP build links
the runtime torch has already loaded, so both share one thread pool; if loading it brings in a
second runtime (clang's libomp beside torch's libgomp), the single-threaded build is used
instead.

A library is loaded only after it is verified, because a damaged one cannot be refused later: a
truncated ELF file can pass ``dlopen`` and kill the process with SIGBUS when a missing page is
touched. A build is written under a temporary name, flushed to disk, and renamed into place beside
a manifest (``<library>.sha256``: its SHA-256 and size); a failed compile leaves no file behind
(the temporary files of a process killed mid-compile are removed by the next build, under the
lock). Before loading, the library and the manifest must be regular files owned by this user and
not writable by group or others, in a directory with the same properties (created mode 0700), and
the library's size and hash must match the manifest. A library that fails this (truncated, zero
bytes, garbage, foreign, another owner, no manifest) is rebuilt. The file that was verified is the
file loaded (through its open descriptor). An unsafe cache directory (another owner, group or world
writable) is not used: the build then goes to a fresh private temporary directory, with a warning,
as it does when the cache directory cannot be written (read-only). Builds are serialised by a lock
(``flock``) on the cache directory, so concurrent processes on a cold cache compile once.

The C side owns its limits and the layout of the struct Python fills (``limits.c``): the loader
reads them (:func:`read_limits`) and the kernels' Python side uses them instead of copies. A
library whose ``kvlens_layer`` is not laid out as :mod:`kvlens.kernels.layer`'s ctypes mirror, or
whose limits cannot be read, is not used, with a warning naming the difference.

:func:`library` returns ``None`` (and torch does the work) off Linux x86-64 and aarch64, with no
compiler, a failed build or load, a build that disagrees with the Python side, or
``KVLENS_NATIVE=0`` in the environment; it never raises. :func:`unavailable_reason` says why, and
:func:`describe` says it in one line for ``kvlens info``.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from kvlens.kernels.toolchain import Toolchain, compiler, probe, unsupported

logger = logging.getLogger(__name__)

SOURCES = tuple(sorted(Path(__file__).parent.glob("*.c")))
HEADERS = tuple(sorted(Path(__file__).parent.glob("*.h")))
MANIFEST_SUFFIX = ".sha256"
TEMPORARY_SUFFIX = ".tmp"
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_lock = threading.Lock()
_state: dict[str, ctypes.CDLL | None] = {}
_loaded_fds: list[int] = []  # descriptors of the loaded libraries, kept open (_load_from)
_notes: dict[str, str] = {}  # "reason": why load() gave None; "single": why one thread


class Limits(NamedTuple):
    """The kernels' limits, as the loaded library reports them (``KVLENS_*`` in kernels.h)."""

    max_rows: int  # more rows than this (a prefill) go to torch
    single_thread_bytes: int  # products with smaller weights run on one thread
    attention_max_group: int  # query heads per key head the native attention takes
    attention_max_d_head: int  # the widest head it takes


_limits: dict[int, tuple[ctypes.CDLL, Limits]] = {}


def cache_dir() -> Path:
    """Where compiled kernels are kept."""
    root = os.environ.get("KVLENS_CACHE_DIR")
    if root:
        return Path(root) / "kernels"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "kvlens" / "kernels"


def unsafe_reason(st: os.stat_result) -> str | None:
    """Why a file or directory with status ``st`` may not be trusted, or ``None`` if it may.

    Trusted means owned by this process's user and writable by nobody else.
    """
    if st.st_uid != os.getuid():
        return f"it is owned by uid {st.st_uid}, not by this user (uid {os.getuid()})"
    if st.st_mode & 0o022:
        return f"it is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def trusted_directory() -> tuple[Path, str | None]:
    """:func:`cache_dir`, created mode 0700, and why it cannot be trusted (``None`` if it can)."""
    directory = cache_dir()
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=0o700)
        st = os.stat(directory)
    except OSError as error:
        return directory, f"it cannot be created or read ({error})"
    if not stat.S_ISDIR(st.st_mode):
        return directory, "it is not a directory"
    return directory, unsafe_reason(st)


def _hash_fd(fd: int) -> str:
    h = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    while chunk := os.read(fd, 1 << 20):
        h.update(chunk)
    return h.hexdigest()


def _read_manifest(library: Path) -> tuple[str, int] | None:
    """The SHA-256 and size recorded for ``library``, or ``None`` if absent or not trusted."""
    try:
        fd = os.open(f"{library}{MANIFEST_SUFFIX}", _OPEN_FLAGS)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or unsafe_reason(st) is not None:
            return None
        digest, size = os.read(fd, 256).decode("ascii").split()
        return digest, int(size)
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


def open_verified(library: Path) -> int | None:
    """An open descriptor of ``library`` if it is trusted and matches its manifest, else ``None``.

    A library that exists but fails a check is reported with a warning (it will be rebuilt).
    """
    try:
        fd = os.open(library, _OPEN_FLAGS)
    except FileNotFoundError:
        return None
    except OSError as error:
        logger.warning("kvlens: cannot open %s (%s); rebuilding it", library, error)
        return None
    try:
        problem = _problem(fd, library)
    except OSError as error:
        problem = str(error)
    if problem is None:
        return fd
    os.close(fd)
    logger.warning("kvlens: not loading %s: %s; rebuilding it", library, problem)
    return None


def _problem(fd: int, library: Path) -> str | None:
    """What is wrong with the open library ``fd``, or ``None``: its status, size, then hash."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        return "it is not a regular file"
    reason = unsafe_reason(st)
    if reason is not None:
        return reason
    manifest = _read_manifest(library)
    if manifest is None:
        return f"it has no trusted manifest {library.name}{MANIFEST_SUFFIX}"
    digest, size = manifest
    if st.st_size != size or size == 0:
        return f"it has {st.st_size} bytes, its build wrote {size} (truncated?)"
    if _hash_fd(fd) != digest:
        return "its SHA-256 does not match its build's (damaged?)"
    return None


class Unwritable(OSError):
    """The build directory cannot be written (read-only, full, another user's)."""


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[bool]:
    """Hold an exclusive lock on ``directory`` (POSIX ``flock``), or go on without one.

    Yields whether the lock is held. Without it (no ``fcntl``, a file system that refuses it)
    concurrent first runs may each compile; the renames keep that safe.
    """
    try:
        import fcntl

        fd = os.open(directory, os.O_RDONLY)
    except (ImportError, OSError):
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # releases the lock


def _remove_leftovers(directory: Path) -> None:
    """Remove the temporary files of compiles that were killed (call with the lock held).

    Every compile holds the lock while its temporary files exist, so under the lock any that
    remain belong to a process that died before its ``finally`` ran.
    """
    with contextlib.suppress(OSError):
        for path in directory.glob(f"kvlens-*{TEMPORARY_SUFFIX}"):
            with contextlib.suppress(OSError):
                path.unlink()
                logger.info("kvlens: removed %s, left by an interrupted build", path)


def _write_synced(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _compile(toolchain: Toolchain, directory: Path, target: Path) -> None:
    """Compile into a temporary file, record its hash, and rename both into place.

    Raises:
        Unwritable: ``directory`` cannot be written.
        OSError, subprocess.SubprocessError: The compiler failed (nothing is left behind).
    """
    logger.info(
        "kvlens: compiling the native kernels with %s into %s (once per machine)",
        toolchain.name,
        target,
    )
    names: list[str] = []
    try:
        for suffix in (".so", MANIFEST_SUFFIX):
            try:
                fd, name = tempfile.mkstemp(
                    prefix="kvlens-", suffix=suffix + TEMPORARY_SUFFIX, dir=directory
                )
            except OSError as error:
                raise Unwritable(error.errno, f"{directory} cannot be written: {error}") from error
            os.close(fd)
            names.append(name)
        tmp, tmp_manifest = names
        sources = [str(path) for path in SOURCES]
        subprocess.run(
            [*toolchain.command, *toolchain.flags, *sources, "-o", tmp, "-lm"],
            check=True,
            capture_output=True,
            text=True,
            timeout=300,
        )
        os.chmod(tmp, 0o700)  # the linker applies the umask, which may leave it group-writable
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # on disk before the rename: a crash must not leave a short file
            digest, size = _hash_fd(fd), os.fstat(fd).st_size
        finally:
            os.close(fd)
        _write_synced(tmp_manifest, f"{digest} {size}\n".encode())
        os.replace(tmp, target)  # atomic: a concurrent reader never sees half a file
        os.replace(tmp_manifest, f"{target}{MANIFEST_SUFFIX}")
    finally:
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)


def build_key(toolchain: Toolchain) -> str:
    """The name of a build: a hash of the sources, the compiler, its flags and its target."""
    parts = [p.read_bytes() for p in SOURCES + HEADERS]
    parts += [toolchain.name.encode(), " ".join(toolchain.flags).encode()]
    parts.append(toolchain.target.encode())
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:20]


def _build_verified(toolchain: Toolchain, directory: Path) -> tuple[Path, int]:
    """The library's path and a verified open descriptor of it, compiling it if need be."""
    target = directory / f"kvlens-{build_key(toolchain)}.so"
    with _locked(directory) as held:
        fd = open_verified(target)  # a read-only cache with a build in it is used as it is
        if fd is None:
            if held:
                _remove_leftovers(directory)
            _compile(toolchain, directory, target)
            fd = open_verified(target)
    if fd is None:
        raise OSError(f"the fresh build {target} does not match its manifest")
    return target, fd


def build(compiler: str, directory: Path | None = None, openmp: bool = True) -> Path:
    """Compile the C sources unless a verified build for them, this compiler and target exists.

    Args:
        compiler: The C compiler's command line (:func:`kvlens.kernels.toolchain.compiler`).
        directory: Where builds are kept; default :func:`cache_dir` (created mode 0700).
        openmp: Build with OpenMP if the compiler has it (else single-threaded).

    Returns:
        The library's path.

    Raises:
        PermissionError: The directory is not trusted (another owner, group or world writable).
        Unwritable: It cannot be written.
        OSError, subprocess.SubprocessError: The build failed.
    """
    if directory is None:
        directory, reason = trusted_directory()
        if reason is not None:
            raise PermissionError(f"the kernel cache {directory} is not used: {reason}")
    path, fd = _build_verified(probe(compiler, openmp), directory)
    os.close(fd)
    return path


def _openmp_runtimes() -> set[str]:
    """The distinct OpenMP runtime files mapped into this process (Linux; empty elsewhere)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return set()
    names = ("libgomp", "libiomp", "libomp")
    return {line.split()[-1] for line in maps.splitlines() if any(n in line for n in names)}


def _dlopen(toolchain: Toolchain) -> ctypes.CDLL:
    """Build (if need be), verify and load the library, in the cache or a private scratch dir."""
    directory, reason = trusted_directory()
    if reason is None:
        try:
            return _load_from(toolchain, directory)
        except Unwritable as error:
            reason = str(error)
    logger.warning(
        "kvlens: not using the kernel cache %s: %s; building the kernels in a private "
        "temporary directory (make it yours with mode 700, or set KVLENS_CACHE_DIR)",
        directory,
        reason,
    )
    scratch = Path(tempfile.mkdtemp(prefix="kvlens-kernels-"))
    try:
        return _load_from(toolchain, scratch)
    finally:  # a loaded library stays mapped once its file is gone
        shutil.rmtree(scratch, ignore_errors=True)


def _load_from(toolchain: Toolchain, directory: Path) -> ctypes.CDLL:
    path, fd = _build_verified(toolchain, directory)
    # Load the very file that was verified: its path could be replaced in between. The
    # descriptor stays open while the process lives: glibc hands out an already loaded library
    # for a name it has seen, so a later load must never see the same /proc/self/fd/N name.
    by_fd = f"/proc/self/fd/{fd}"
    try:
        lib = ctypes.CDLL(by_fd if os.path.exists(by_fd) else str(path))
    except OSError:
        os.close(fd)
        raise
    _loaded_fds.append(fd)
    return lib


def _declare(lib: ctypes.CDLL) -> None:
    """Set the argument and return types of the library's functions (AttributeError if absent)."""
    i64, ptr, f32, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    signatures = {
        "kvlens_matmul_small": [i64, i64, i64, ptr, i64, ptr, ptr, ptr, ptr, i32],
        "kvlens_rms_norm": [i64, i64, ptr, i64, ptr, f32, ptr],
        "kvlens_rotary_inplace": [i64, i64, i64, ptr, i64, i64, ptr, ptr, i64, i32],
        "kvlens_silu_mul": [i64, i64, ptr, i64, ptr, i64, ptr],
        "kvlens_layer_norm": [i64, i64, ptr, i64, ptr, ptr, f32, ptr],
        "kvlens_activation": [i64, i64, ptr, i64, ptr, i32],
        "kvlens_decode_attention": [i64] * 5
        + [ptr, i64, i64, ptr, ptr, i64, i64, i64]
        + [ptr, i64, f32, ptr, ptr, ptr, i32],
        "kvlens_decode_layer": [ptr],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = None, argtypes
    counts = {
        "kvlens_decode_layer_workspace": [ptr],
        "kvlens_matmul_scratch": [i64, i64, i32],
        "kvlens_decode_attention_scratch": [i64] * 5,
        "kvlens_layer_size": [],
        "kvlens_openmp_threads": [i64],
        **{f"kvlens_{name}": [] for name in Limits._fields},
    }
    for name, argtypes in counts.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = i64, argtypes
    checked = {  # return 0, or -1 for arguments outside their limits
        "kvlens_qmatmul": [i64, i64, i64, i32, ptr, ptr, i64, ptr, ptr, i64, i32],
        "kvlens_qdequantize": [i64, i32, ptr, i64, i64, ptr, i32],
    }
    for name, argtypes in checked.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = i32, argtypes
    lib.kvlens_qblock_bytes.restype, lib.kvlens_qblock_bytes.argtypes = i64, [i32]
    out = ctypes.POINTER(ctypes.c_int64)
    lib.kvlens_layer_field.restype = ctypes.c_char_p
    lib.kvlens_layer_field.argtypes = [i64, out, out]
    lib.kvlens_activation_name.restype = ctypes.c_char_p
    lib.kvlens_activation_name.argtypes = [i64]


def read_limits(lib: ctypes.CDLL) -> Limits:
    """The limits ``lib`` reports, read from it once (later calls return the same object)."""
    seen = _limits.get(id(lib))
    if seen is not None and seen[0] is lib:
        return seen[1]
    limits = Limits(*(getattr(lib, f"kvlens_{name}")() for name in Limits._fields))
    _limits[id(lib)] = (lib, limits)  # holds lib, so its id is not reused
    return limits


def disagreement(lib: ctypes.CDLL) -> str | None:
    """How the library's limits or struct layout disagree with the Python side, or ``None``."""
    from kvlens.kernels.layer import layout_problem  # layer.py imports this module

    limits = read_limits(lib)
    bad = [f"{name} = {value}" for name, value in limits._asdict().items() if value <= 0]
    if bad:
        return f"it reports impossible limits ({', '.join(bad)})"
    return activation_problem(lib) or layout_problem(lib)


# Each act_fn's name in the library (kvlens_activation_name), for the check of ACTIVATIONS' codes.
_KERNEL_ACTIVATION = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
}


def activation_problem(lib: ctypes.CDLL) -> str | None:
    """How ``ACTIVATIONS``' codes differ from the library's ``KVLENS_ACT_*``, or ``None``."""
    from kvlens.kernels import ACTIVATIONS  # kvlens.kernels imports this module

    for act_fn, code in ACTIVATIONS.items():
        name = lib.kvlens_activation_name(code)
        want = _KERNEL_ACTIVATION.get(act_fn)
        if name is None or name.decode() != want:
            got = None if name is None else name.decode()
            return (
                f"activation code {code} is {got!r} in the library, {want!r} ({act_fn}) in "
                "kvlens/kernels/__init__.py"
            )
    return None


def load() -> ctypes.CDLL | None:
    """Build (if need be), verify and load the library with its signatures; ``None`` if not.

    Never raises: every failure is logged (a warning unless it is this platform's or the user's
    choice), recorded for :func:`unavailable_reason`, and torch does the work.
    """
    lib, note = _load()
    _notes["reason" if lib is None else "build"] = note
    if lib is not None:
        _notes.pop("reason", None)
    return lib


def _load() -> tuple[ctypes.CDLL | None, str]:
    """The library and how it was built, or ``None`` and why not."""
    line = compiler()
    if os.environ.get("KVLENS_NATIVE", "1") == "0":
        return None, "KVLENS_NATIVE=0 turns them off"
    reason = unsupported()
    if reason is None and not SOURCES:
        reason = "the kernels' C sources are not installed"
    if reason is None and line is None:
        reason = "no C compiler found (set KVLENS_CC or CC)"
    if reason is not None or line is None:
        logger.info("kvlens: %s; torch does the native kernels' work", reason)
        return None, str(reason)
    before = _openmp_runtimes()
    try:
        toolchain = probe(line)
        lib = _dlopen(toolchain)
        if toolchain.openmp and before and len(_openmp_runtimes()) > len(before):
            # A second OpenMP runtime would run its own thread pool beside torch's, and two
            # pools spinning on the same cores stall each other: the one-thread build (which
            # never starts the other runtime's pool) is the safer choice.
            logger.warning(
                "kvlens: %s links another OpenMP runtime than torch's; using a single-threaded "
                "build of the native kernels",
                toolchain.name,
            )
            toolchain = probe(line, openmp=False)
            lib = _dlopen(toolchain)
        _declare(lib)
        problem = disagreement(lib)
    except (OSError, AttributeError, subprocess.SubprocessError) as error:
        detail = _summary(error)
        logger.warning("kvlens: native kernels unavailable, using torch (%s)", detail)
        return None, f"they could not be built or loaded ({detail})"
    if problem is not None:
        # Filling a struct C reads at other offsets, or a buffer sized by another limit, would
        # silently overwrite memory: this build and this Python code do not belong together.
        logger.warning("kvlens: not using the native kernels, using torch: %s", problem)
        return None, f"the build disagrees with kvlens's Python side: {problem}"
    threads = "OpenMP" if toolchain.openmp else "single-threaded: the compiler has no OpenMP"
    return lib, f"{toolchain.name}, {threads}"


def _summary(error: BaseException) -> str:
    """A failure in a line or two: a compiler's first error, else the exception."""
    stderr = getattr(error, "stderr", None)
    if isinstance(stderr, bytes):
        stderr = stderr.decode(errors="replace")
    lines = [line.strip() for line in (stderr or "").splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or [str(error)])[0]


def unavailable_reason() -> str | None:
    """Why torch does the native kernels' work in this process, or ``None`` if they are loaded."""
    if library() is not None:
        return None
    return _notes.get("reason", "they were not loaded")


def describe() -> str:
    """Whether the native kernels run, built how, or why torch does their work: one line."""
    reason = unavailable_reason()
    if reason is not None:
        return f"no, torch does their work: {reason}"
    return f"yes ({_notes.get('build', 'built elsewhere')})"


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first call; ``None`` when unavailable."""
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                _state["lib"] = load()
    return _state["lib"]


def available() -> bool:
    """Whether the native kernels are built and loaded (building them if need be)."""
    return library() is not None
