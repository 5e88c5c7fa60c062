"""What every benchmark worker process shares, with the standard library only (the peers'
environments have neither kvlens nor, for llama.cpp, torch): its records to the orchestrator and
its memory figures."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
from pathlib import Path
from typing import Any

PREFIX = "@bench "
"""The prefix of a record line on a worker's standard output."""


def emit(kind: str, **fields: Any) -> None:
    """Print one record for the orchestrator."""
    print(PREFIX + json.dumps({"kind": kind, **fields}), flush=True)


def status_mb(name: str) -> float | None:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in MB, None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (``VmHWM``) to the current RSS; False if impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def release_memory() -> None:
    """Collect garbage and return the allocator's free pages to the system."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def run_worker(
    command: list[str], threads: int, timeout: float, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run one worker process (the orchestrator's side) with ``threads`` threads, offline.

    Returns ``status`` (``"ok"``, ``"error: exit N"``, ``"killed after T s"``), ``wall_s``,
    ``records`` (every ``@bench`` line, a dict with its ``kind``, in order; what a killed worker
    printed before is kept) and ``stderr``.
    """
    import os
    import subprocess
    import time

    here = Path(__file__).resolve().parent
    full = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    full.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    full.update(env or {})
    start, status, stdout, stderr = time.perf_counter(), "ok", "", ""
    try:
        proc = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env=full, cwd=here,
            check=False,
        )  # fmt: skip
        stdout, stderr = proc.stdout, proc.stderr
        if proc.returncode != 0:
            status = f"error: exit {proc.returncode}"
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or b""
        stdout = out.decode(errors="replace") if isinstance(out, bytes) else out
        status = f"killed after {timeout:.0f} s"
    records = [
        json.loads(line[len(PREFIX) :]) for line in stdout.splitlines() if line.startswith(PREFIX)
    ]
    return {
        "status": status, "wall_s": time.perf_counter() - start, "records": records,
        "stderr": stderr,
    }  # fmt: skip
