"""Worker harness of the shared-prefix benchmark, for kvlens's worker and the peers' alike.

A worker is a fresh process that builds one system on a model of random weights and runs one
configuration: ``N`` rows, each a ``suffix``-token continuation of the same ``prefix``-token
prompt. It imports only the standard library and torch (the peers' virtual environment has no
kvlens) and prints JSON records prefixed ``@bench`` for ``bench_shared_prefix.py`` to collect.

What one run measures (the prefix itself is prefilled once, at batch 1, before any run):

- ``copy_s``: giving the N rows the prefix: nothing for kvlens's shared cache, a copy of the
  prefix's keys and values into every row for the others;
- ``prefill_s``: the N suffixes through the model, up to the first new token;
- ``step_s``: each of the ``steps`` greedy decode steps after it.

Memory: after the prefix prefill and a short warm-up run, freed memory is handed back to the
system (``malloc_trim``), the resident size is read and the kernel's peak-RSS counter reset
(``/proc/self/clear_refs``); after the timed runs the peak (``VmHWM``) is read. So
``peak_rss_mb`` is the largest resident size of the whole process (weights, prefix and the
runs) while running this configuration. ``cache_mb`` is what the system's key-value storage
holds at the end of a run, counted from its tensors.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from worker_process import emit, release_memory, reset_peak_rss, status_mb

# SmolLM2-135M's shape: 30 layers, d_model 576, 9 query heads over 3 key/value heads.
SMOLLM2 = {
    "n_layers": 30,
    "d_model": 576,
    "n_heads": 9,
    "n_key_value_heads": 3,
    "d_head": 64,
    "d_mlp": 1536,
    "d_vocab": 49152,
    "n_ctx": 8192,
    "rotary_base": 100000.0,
    "eps": 1e-5,
}


@dataclass
class Run:
    """Times of one run, in seconds, and the key-value storage it ended with."""

    copy_s: float
    prefill_s: float
    step_s: list[float]
    cache_mb: float
    extra: dict[str, Any] = field(default_factory=dict)


class System(Protocol):
    """One system under test, built on one model."""

    def prefill_prefix(self, prefix: Tensor) -> Any:
        """Run the batch-1 prefix ``[1, P]`` once; return what every run starts from."""
        ...

    def run(self, state: Any, suffixes: Tensor, steps: int) -> Run:
        """Give the rows the prefix, prefill ``suffixes`` ``[N, S]``, decode ``steps`` tokens."""
        ...


def stamps_to_run(
    start: float, stamps: list[float], copy_s: float, cache_mb: float, steps: int
) -> Run:
    """A :class:`Run` from the times at which each new token's logits were ready."""
    if len(stamps) != steps + 1:
        raise RuntimeError(f"expected {steps + 1} new tokens, the system produced {len(stamps)}")
    step_s = [b - a for a, b in itertools.pairwise(stamps)]
    return Run(copy_s, stamps[0] - start, step_s, cache_mb)


def tensor_mb(tensors: Any) -> float:
    """Megabytes of ``tensors``, each storage counted once."""
    seen: dict[int, int] = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values()) / 1e6


def random_tokens(d_vocab: int, batch: int, length: int, seed: int) -> Tensor:
    """Token ids ``[batch, length]``; the speed does not depend on which."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, d_vocab, (batch, length), generator=gen)


def worker_main(
    spec: dict[str, Any], build: Callable[[dict[str, Any]], tuple[System, dict[str, Any]]]
) -> None:
    """Build the system ``spec`` names and run its configuration (see the module docstring)."""
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    started = time.perf_counter()
    system, info = build(spec)
    emit("info", build_s=time.perf_counter() - started, torch=torch.__version__, **info)
    d_vocab, n, steps = SMOLLM2["d_vocab"], spec["n"], spec["steps"]
    prefix = random_tokens(d_vocab, 1, spec["prefix"], spec["seed"])
    suffixes = random_tokens(d_vocab, n, spec["suffix"], spec["seed"] + 1)
    with torch.inference_mode():
        started = time.perf_counter()
        state = system.prefill_prefix(prefix)
        emit("prefix", prefix_prefill_s=time.perf_counter() - started)
        system.run(state, suffixes[:, :4], 2)  # warm-up
        release_memory()
        rss_before = status_mb("VmRSS")
        peak_reset = reset_peak_rss()
        started = time.perf_counter()
        for index in range(spec["repeats"]):
            run = system.run(state, suffixes, steps)
            emit(
                "run",
                index=index,
                copy_s=run.copy_s,
                prefill_s=run.prefill_s,
                decode_ms=1e3 * statistics.median(run.step_s),
                decode_mean_ms=1e3 * statistics.mean(run.step_s),
                total_s=run.copy_s + run.prefill_s + sum(run.step_s),
                cache_mb=run.cache_mb,
                **run.extra,
            )
            del run
            release_memory()
            elapsed = time.perf_counter() - started
            # Stop when one more run like these would end past the budget.
            if elapsed * (index + 2) / (index + 1) > spec["budget_s"]:
                break
    emit(
        "memory",
        rss_before_mb=rss_before,
        peak_rss_mb=status_mb("VmHWM") if peak_reset else None,
    )
