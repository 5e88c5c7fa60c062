"""Timing harness shared by the generation benchmark's workers.

A worker (``generate_kvlens.py`` for kvlens, ``peers/generate_peer.py`` for TransformerLens and
Hugging Face) is a fresh process for one system and one model shape. It builds the model once
and gives :func:`main` a :class:`System` whose ``generate`` runs greedily and notes when each new
token's logits were ready. The harness runs the grid's configurations, smallest first, then the
context sweep, and prints one JSON record per line, prefixed ``@bench``, for
``bench_generate.py`` to collect. It imports only the standard library and torch, because the
peers' virtual environment has no kvlens.

Timing of one run (one generate call of ``n`` new tokens from a prompt):

- prefill: from the call to the first new token's logits;
- decode ms/step: from the first token's logits to the last, over ``n - 1`` steps (each step's
  sampling and bookkeeping included; the prefill excluded);
- total: the whole call, from which tokens per second is ``batch * n / total``.

Memory of a configuration: after its warm-up, state kept between calls is dropped, freed memory
is handed back to the system (``malloc_trim``), the kernel's peak-RSS counter is reset
(``/proc/self/clear_refs``) and the resident size read; after the runs the peak is read. So
``peak_rss_mb`` is the process's largest resident size while generating that configuration, the
weights and runtime included, and not the model build's transient peak.

Memory read rate around a configuration (and a sweep point): a ``sum`` over 256 MB, just before
it and just after it (outside its memory window). This machine's memory bandwidth drifts over
minutes with the load of the host it shares (30 to 45 GB/s within one hour), so a row's floor
can also be taken at the rate measured beside it.
"""

from __future__ import annotations

import contextlib
import json
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor, nn

from worker_process import emit, release_memory, reset_peak_rss, status_mb

WARMUP_PROMPT = 16
WARMUP_TOKENS = 4


@dataclass
class Timing:
    """``perf_counter`` times of one generate call: its start, each new token's, its end."""

    start: float
    stamps: list[float]
    end: float

    def steps(self) -> list[float]:
        """Seconds of each decode step (the gaps between consecutive new tokens)."""
        return [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)]


GenerateFn = Callable[[Tensor, int], Timing]


def _nothing() -> None:
    pass


@dataclass
class System:
    """A built model: how to generate, what to report about it, how to drop kept state."""

    generate: GenerateFn
    info: dict[str, Any]
    reset: Callable[[], None] = field(default=_nothing)


class _HasInfo(Protocol):
    info: dict[str, Any]


SystemT = TypeVar("SystemT", bound=_HasInfo)  # a built system of any harness


class TimeLimit(Exception):
    """A configuration or sweep point ran past its limit."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`TimeLimit` in this thread after ``seconds`` (at the next Python bytecode)."""

    def on_alarm(signum: int, frame: Any) -> None:
        raise TimeLimit

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def prompt_tokens(d_vocab: int, batch: int, length: int, seed: int) -> Tensor:
    """Random token ids ``[batch, length]`` (the speed does not depend on which)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, d_vocab, (batch, length), generator=gen)


def module_info(model: nn.Module) -> dict[str, Any]:
    """Parameter count and the bytes of parameters and buffers (each storage counted once)."""
    seen: set[int] = set()
    param_bytes = buffer_bytes = n_params = 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            n_params += p.numel()
            param_bytes += p.numel() * p.element_size()
    for b in model.buffers():
        if b.data_ptr() not in seen:
            seen.add(b.data_ptr())
            buffer_bytes += b.numel() * b.element_size()
    return {"n_params": n_params, "weights_mb": param_bytes / 1e6, "buffers_mb": buffer_bytes / 1e6}


def timed_run(system: System, tokens: Tensor, n: int) -> Timing:
    timing = system.generate(tokens, n)
    if len(timing.stamps) != n:
        raise RuntimeError(f"asked for {n} new tokens, the system produced {len(timing.stamps)}")
    return timing


def warm_up(system: System, d_vocab: int, batch: int, seed: int) -> None:
    """A short generation first, so one-time costs (lazy setup, first allocations) stay out."""
    timed_run(system, prompt_tokens(d_vocab, batch, WARMUP_PROMPT, seed + 1), WARMUP_TOKENS)


def read_rate(megabytes: int = 256, repeats: int = 7) -> float:
    """GB/s of a ``sum`` over a fresh ``megabytes`` tensor (median of ``repeats``)."""
    x = torch.ones(megabytes * 2**20 // 4)
    x.sum()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    rate = x.numel() * 4 / statistics.median(times) / 1e9
    del x
    release_memory()
    return rate


def run_config(system: System, spec: dict[str, Any], batch: int, prompt: int) -> None:
    """Up to ``repeats`` runs of one (batch, prompt); stops early where another would pass
    the budget, and is cut at ``config_timeout_s``."""
    d_vocab, new, where = spec["shape"]["d_vocab"], spec["new_tokens"], {"batch": batch}
    where["prompt"] = prompt
    read_before = read_rate()
    peak_reset, rss_before, status = False, None, "ok"
    try:
        with time_limit(spec["config_timeout_s"]):
            warm_up(system, d_vocab, batch, spec["seed"])
            tokens = prompt_tokens(d_vocab, batch, prompt, spec["seed"])
            system.reset()
            release_memory()
            rss_before = status_mb("VmRSS")
            peak_reset = reset_peak_rss()
            started = time.perf_counter()
            for index in range(spec["repeats"]):
                timing = timed_run(system, tokens, new)
                steps = timing.steps()
                emit(
                    "run",
                    **where,
                    index=index,
                    prefill_ms=1e3 * (timing.stamps[0] - timing.start),
                    decode_ms=1e3 * sum(steps) / len(steps),
                    decode_median_ms=1e3 * statistics.median(steps),
                    total_s=timing.end - timing.start,
                )
                elapsed = time.perf_counter() - started
                # Another run like the ones so far would end past the budget.
                if elapsed * (index + 2) / (index + 1) > spec["budget_s"]:
                    break
    except TimeLimit:
        status = f"cut at {spec['config_timeout_s']:.0f} s"
    peak = status_mb("VmHWM") if peak_reset else None
    emit("memory", **where, status=status, rss_before_mb=rss_before, peak_rss_mb=peak)
    system.reset()
    release_memory()
    emit("read", **where, gb_s=[read_before, read_rate()])


def run_sweep(system: System, spec: dict[str, Any]) -> None:
    """Decode ms/step at each context length: a prefill of that length, then ``steps`` steps."""
    d_vocab, batch, steps = spec["shape"]["d_vocab"], spec["sweep_batch"], spec["sweep_steps"]
    warm_up(system, d_vocab, batch, spec["seed"])
    for context in spec["contexts"]:
        tokens = prompt_tokens(d_vocab, batch, context, spec["seed"])
        read_before = read_rate()
        try:
            with time_limit(spec["config_timeout_s"]):
                timing = timed_run(system, tokens, steps + 1)
        except TimeLimit:
            emit("point", context=context, status=f"cut at {spec['config_timeout_s']:.0f} s")
            return  # longer contexts would take longer still
        step_s = timing.steps()
        emit(
            "point",
            context=context,
            status="ok",
            prefill_ms=1e3 * (timing.stamps[0] - timing.start),
            decode_ms=1e3 * statistics.median(step_s),
            decode_mean_ms=1e3 * sum(step_s) / len(step_s),
            read_gb_s_beside=[read_before, read_rate()],
        )
        system.reset()


def start(build: Callable[[dict[str, Any]], SystemT]) -> tuple[dict[str, Any], SystemT]:
    """Read the JSON spec in ``argv[1]``, set torch's threads and seed, build the system and
    report its build time and memory (an ``info`` record); the spec and the system."""
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    began = time.perf_counter()
    system = build(spec)
    release_memory()
    emit(
        "info",
        build_s=time.perf_counter() - began,
        rss_after_build_mb=status_mb("VmRSS"),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        **system.info,
    )
    return spec, system


def main(build: Callable[[dict[str, Any]], System]) -> None:
    """Build the model described by the JSON spec in ``argv[1]``, run its grid, then its sweep."""
    spec, system = start(build)
    for batch, prompt in spec["grid"]:
        run_config(system, spec, batch, prompt)
    if spec["contexts"]:
        run_sweep(system, spec)
