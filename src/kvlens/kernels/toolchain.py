"""Which C compiler builds the kernels, with which flags, for which target.

The compiler is ``$KVLENS_CC`` (a command line, split as a shell would split it, e.g.
``KVLENS_CC="python -m ziglang cc"`` for zig's clang), else ``$CC``, else ``cc`` or ``gcc`` on
the ``PATH``. GCC and clang both build the kernels (CI builds and tests them with each).

The kernels are built for the CPU they run on (``-march=native``, or ``-mcpu=native`` where the
compiler wants that) with OpenMP where the compiler has it (``-fopenmp`` and its ``omp.h``). A
compiler without OpenMP (Apple's clang, clang without libomp, zig cc) builds them with
``-fopenmp-simd`` instead: the same vector code, every parallel region on one thread.

:func:`probe` finds out which of these the compiler takes by preprocessing a few bytes with
them, and identifies the target by the macros the compiler predefines for those flags (its
version, and one macro per instruction-set extension it targets: ``__AVX512F__``,
``__ARM_FEATURE_SVE``...). A build is named by a hash that includes them, so a cache shared
between machines never hands one a library built for instructions its CPU lacks.

The kernels are built only on Linux on x86-64 and aarch64 (:func:`unsupported`), where they are
tested; elsewhere torch does their work.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shlex
import shutil
import subprocess
from typing import NamedTuple

SUPPORTED = (("Linux", "x86_64"), ("Linux", "aarch64"))
BASE_FLAGS = ("-O3", "-shared", "-fPIC", "-std=gnu11")
ARCH_FLAGS = ("-march=native", "-mcpu=native")  # the first the compiler takes
OPENMP, NO_OPENMP = "-fopenmp", "-fopenmp-simd"


class Toolchain(NamedTuple):
    """A compiler command and the flags the kernels are built with."""

    command: tuple[str, ...]  # the compiler, as split from its command line
    flags: tuple[str, ...]  # BASE_FLAGS, the target flag, OPENMP or NO_OPENMP
    openmp: bool  # built with OpenMP (else single-threaded)
    target: str  # SHA-256 of the macros predefined for these flags: the version and the ISA

    @property
    def name(self) -> str:
        """The compiler's command line, for messages."""
        return shlex.join(self.command)


def compiler() -> str | None:
    """The compiler's command line: ``$KVLENS_CC``, ``$CC``, ``cc`` or ``gcc``; ``None`` if none."""
    return (
        os.environ.get("KVLENS_CC")
        or os.environ.get("CC")
        or shutil.which("cc")
        or shutil.which("gcc")
    )


def unsupported() -> str | None:
    """Why the kernels are not built on this platform, or ``None`` where they are."""
    system, machine = platform.system(), platform.machine()
    if (system, machine) in SUPPORTED:
        return None
    return f"the kernels are built only on Linux x86-64 and aarch64, not on {system} {machine}"


def _macros(command: tuple[str, ...], flags: tuple[str, ...], source: str) -> tuple[str, str]:
    """The macros the compiler predefines with ``flags`` (``""`` if it refuses), and its stderr."""
    process = subprocess.run(
        [*command, *flags, "-dM", "-E", "-x", "c", "-"],
        input=source,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return (process.stdout if process.returncode == 0 else ""), process.stderr.strip()


def probe(compiler_line: str, openmp: bool = True) -> Toolchain:
    """The flags ``compiler_line`` builds the kernels with here, and its target's fingerprint.

    Args:
        compiler_line: The compiler's command line (see :func:`compiler`).
        openmp: Try OpenMP first (else build single-threaded without asking).

    Raises:
        OSError: The compiler cannot be run, or takes no flag that targets this CPU.
        subprocess.SubprocessError: It did not answer in time.
    """
    command = tuple(shlex.split(compiler_line))
    if not command:
        raise OSError("the compiler's command line is empty")
    attempts = [(OPENMP, "#include <omp.h>\n")] if openmp else []
    attempts.append((NO_OPENMP, ""))
    errors = []
    for arch in ARCH_FLAGS:
        for threads, source in attempts:
            flags = (*BASE_FLAGS, arch, threads)
            macros, error = _macros(command, flags, source)
            if macros:
                digest = hashlib.sha256(macros.encode()).hexdigest()
                return Toolchain(command, flags, threads == OPENMP, digest)
            errors.append(error.splitlines()[-1] if error else f"{arch} {threads} refused")
    raise OSError(f"{shlex.join(command)} cannot compile for this CPU: {'; '.join(errors)}")
