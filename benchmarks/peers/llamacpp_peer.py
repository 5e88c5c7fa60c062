"""Worker of ``bench_quantized.py`` for llama.cpp (llama-cpp-python 0.3.36): one fresh process.

Runs inside ``.llamacpp-venv`` (``make-llamacpp-venv.sh`` beside this file), which has numpy and
llama_cpp but neither kvlens nor torch, so it imports only those and the standard library.

Load: ``Llama(model_path, n_threads=n_threads_batch=threads, n_ctx, n_batch, use_mmap=False,
logits_all=False)``. ``use_mmap=False`` reads the weights into the process's own memory, so the
resident size after load (``VmRSS``) counts them, as it does for kvlens; ``n_ctx`` holds the
prompt and the new tokens; ``n_batch`` and ``n_ubatch`` are at least the prompt length, so the
prompt is one batch.

One run (greedy, through the low-level loop, no sampler):

- prefill: ``llm.reset()``, ``llm.eval(prompt)`` and the argmax of the last position's logits,
  the first new token;
- decode: ``n - 1`` steps of ``llm.eval([token])`` and the argmax of its logits.

The logits are read where llama.cpp wrote them, through ``llama_get_logits_ith(ctx, -1)`` viewed
as a numpy array (no copy; ``logits_all=False`` keeps ``eval`` from copying them into
``llm.scores``). A warm-up run comes first, then ``repeats`` timed runs; each is one ``run``
record, the median over them an ``summary`` record. Records are JSON lines prefixed ``@bench``.

Usage (normally through bench_quantized.py)::

    .llamacpp-venv/bin/python benchmarks/peers/llamacpp_peer.py '<JSON spec>'

The spec: ``model`` (the GGUF path), ``threads``, ``prompt`` (token ids), ``new_tokens``,
``repeats``.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from worker_process import emit, release_memory, status_mb

WARMUP_TOKENS = 4


def load(spec: dict[str, Any]) -> llama_cpp.Llama:
    """The model, its weights resident, its context sized for the prompt and the new tokens."""
    n_prompt = len(spec["prompt"])
    batch = max(128, n_prompt)
    return llama_cpp.Llama(
        model_path=spec["model"],
        n_threads=spec["threads"],
        n_threads_batch=spec["threads"],
        n_ctx=n_prompt + spec["new_tokens"] + 16,
        n_batch=batch,
        n_ubatch=batch,
        use_mmap=False,
        logits_all=False,
        verbose=False,
    )


def next_token(llm: llama_cpp.Llama) -> int:
    """The argmax of the last evaluated position's logits, read in place."""
    pointer = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return int(np.ctypeslib.as_array(pointer, shape=(llm.n_vocab(),)).argmax())


def run(llm: llama_cpp.Llama, prompt: list[int], n: int) -> tuple[float, list[float], list[int]]:
    """One greedy run of ``n`` new tokens: prefill seconds, each decode step's, the tokens."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    tokens = [next_token(llm)]
    prefill = time.perf_counter() - start
    steps = []
    for _ in range(n - 1):
        began = time.perf_counter()
        llm.eval([tokens[-1]])
        tokens.append(next_token(llm))
        steps.append(time.perf_counter() - began)
    return prefill, steps, tokens


def main() -> None:
    """Load, warm up, time ``repeats`` runs, report them and their medians."""
    spec = json.loads(sys.argv[1])
    began = time.perf_counter()
    llm = load(spec)
    release_memory()
    emit(
        "info",
        build_s=time.perf_counter() - began,
        rss_after_build_mb=status_mb("VmRSS"),
        llama_cpp_python=version("llama-cpp-python"),
        threads=spec["threads"],
        n_ctx=llm.n_ctx(),
        n_batch=llm.n_batch,
        n_vocab=llm.n_vocab(),
        use_mmap=False,
        system_info=llama_cpp.llama_print_system_info().decode(errors="replace"),
    )
    prompt, n = spec["prompt"], spec["new_tokens"]
    run(llm, prompt, WARMUP_TOKENS)
    emit("memory", rss_after_warmup_mb=status_mb("VmRSS"))
    prefills, medians, means = [], [], []
    for index in range(spec["repeats"]):
        prefill, steps, tokens = run(llm, prompt, n)
        prefills.append(1e3 * prefill)
        medians.append(1e3 * statistics.median(steps))
        means.append(1e3 * statistics.fmean(steps))
        emit(
            "run",
            index=index,
            prefill_ms=prefills[-1],
            decode_median_ms=medians[-1],
            decode_ms=means[-1],
            tokens=tokens,
        )
    emit(
        "summary",
        prefill_ms=statistics.median(prefills),
        decode_median_ms=statistics.median(medians),
        decode_ms=statistics.median(means),
        rss_peak_mb=status_mb("VmHWM"),
    )


if __name__ == "__main__":
    main()
