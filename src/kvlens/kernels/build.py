"""Compiling and loading kvlens's C kernels: once per machine, cached, never required.

The sources (``*.c`` and ``kernels.h`` beside this file; GCC's C with its vector extensions) are
compiled with the system C compiler (``cc -O3 -march=native -fopenmp``, a few seconds) into one
shared library in ``~/.cache/kvlens/kernels`` (``$KVLENS_CACHE_DIR`` or ``$XDG_CACHE_HOME`` move
it), named by a hash of the sources, the compiler, the flags and the CPU, written atomically, and
loaded with ctypes. The library links the OpenMP runtime torch has already loaded, so both share
one thread pool; if loading it would bring in a second runtime, it is not used.

:func:`library` returns ``None`` (and torch does the work) with no compiler, a failed build, or
``KVLENS_NATIVE=0`` in the environment.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

SOURCES = tuple(sorted(Path(__file__).parent.glob("*.c")))
HEADERS = tuple(sorted(Path(__file__).parent.glob("*.h")))
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
_lock = threading.Lock()
_state: dict[str, ctypes.CDLL | None] = {}


def cache_dir() -> Path:
    """Where compiled kernels are kept."""
    root = os.environ.get("KVLENS_CACHE_DIR")
    if root:
        return Path(root) / "kernels"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "kvlens" / "kernels"


def _cpu_signature() -> str:
    """The CPU's model and feature flags: ``-march=native`` builds are only valid on the same."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = [line for line in lines if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(wanted)))


def build(compiler: str) -> Path:
    """Compile the C sources unless a build for them, this compiler and CPU exists; its path."""
    parts = [p.read_bytes() for p in SOURCES + HEADERS]
    parts += [compiler.encode(), " ".join(FLAGS).encode(), _cpu_signature().encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:20]
    directory = cache_dir()
    target = directory / f"kvlens-{key}.so"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    logger.info("kvlens: compiling the native kernels into %s (once per machine)", target)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *FLAGS, *map(str, SOURCES), "-o", tmp, "-lm"],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        os.replace(tmp, target)  # atomic: a concurrent build or reader never sees half a file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _openmp_runtimes() -> set[str]:
    """The distinct OpenMP runtime files mapped into this process (Linux; empty elsewhere)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return set()
    names = ("libgomp", "libiomp", "libomp")
    return {line.split()[-1] for line in maps.splitlines() if any(n in line for n in names)}


def load() -> ctypes.CDLL | None:
    """Build (if need be) and load the library with its signatures; ``None`` if unavailable."""
    if os.environ.get("KVLENS_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not SOURCES:
        logger.warning("kvlens: the kernels' C sources are not installed; using torch")
        return None
    if compiler is None:
        logger.info("kvlens: no C compiler found; using torch for decode matrix products")
        return None
    before = _openmp_runtimes()
    try:
        lib = ctypes.CDLL(str(build(compiler)))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", "") or error
        logger.warning("kvlens: native kernels unavailable, using torch (%s)", detail)
        return None
    if before and len(_openmp_runtimes()) > len(before):
        # A second OpenMP runtime would run its own thread pool beside torch's, and two pools
        # spinning on the same cores stall each other; torch alone is the safer choice.
        logger.warning("kvlens: native kernels link another OpenMP runtime; using torch")
        return None
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
    lib.kvlens_decode_layer_workspace.restype = i64
    lib.kvlens_decode_layer_workspace.argtypes = [ptr]
    return lib


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
