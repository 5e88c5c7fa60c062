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
