"""Timing harness shared by the workers of ``bench_interp.py`` (generation while hooking).

A worker (``interp_kvlens.py`` for kvlens, ``peers/interp_peer.py`` for nnsight and
TransformerLens 2.18 and 4.3) is a fresh process for one system, one scenario and one batch size.
It loads the model from the benchmark's weights folder and gives :func:`main` an
:class:`InterpSystem`, whose methods run one greedy ``generate`` call in each scenario:

- ``plain``: no hook;
- ``steer``: a fixed vector added to layer ``STEER_LAYER``'s residual stream output at every
  position of every pass;
- ``record``: every layer's residual stream output kept for every position of every pass (a
  list of per-pass tensors per layer, the user's after the call);
- ``cache`` (``return_cache``): the system's own ``generate(return_cache=True, names_filter=...)``
  over every layer's ``hook_resid_post``; ``cache_all`` with ``names_filter=None`` (every hook
  point).

One measurement: a warm-up call, then ``repeats`` timed calls on the same prompt (up to
``max_repeats`` while their times disagree by more than ``spread``). Each call's time
is the whole generate call (prefill, every decode step, the hooks' work) by ``perf_counter``;
``ms_per_token`` is that time divided by the number of new tokens. After the timed calls the
output of the last one is checked (shapes; recorded activations against an uncached forward pass
over the same tokens) and the generated tokens are reported, so the orchestrator can compare
systems and scenarios (steered tokens must differ from plain ones).

Records are JSON lines prefixed ``@bench`` (``generate_harness.PREFIX``). Standard library and
torch only: the peers' environments have no kvlens.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from generate_harness import (
    TimeLimit,
    emit,
    read_rate,
    release_memory,
    start,
    status_mb,
    time_limit,
)

STEER_LAYER = 15
SCENARIOS = ("plain", "steer", "record", "cache", "cache_all")


def resid_post_names(n_layers: int) -> list[str]:
    """TransformerLens's names of every layer's residual stream output."""
    return [f"blocks.{i}.hook_resid_post" for i in range(n_layers)]


def steering_vector(d_model: int, seed: int, scale: float) -> Tensor:
    """The fixed random vector every system adds (same seed, same values everywhere)."""
    gen = torch.Generator().manual_seed(seed + 7)
    return scale * torch.randn(d_model, generator=gen)


def prompt_tokens(d_vocab: int, batch: int, length: int, seed: int) -> Tensor:
    """Random token ids ``[batch, length]``, the same in every worker for a given seed."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, d_vocab, (batch, length), generator=gen)


@dataclass
class Output:
    """What one generate call returned: the tokens and, for ``record``, ``cache`` and
    ``cache_all``, the activations (``acts[i]``: layer i's ``[batch, pos, d_model]``, the
    per-pass pieces joined after timing) and how many hook points the cache held."""

    tokens: Tensor
    acts: list[Tensor] | None = None
    n_names: int | None = None


@dataclass
class InterpSystem:
    """A loaded model: one callable per scenario it supports, and an uncached forward pass.

    ``run[scenario](tokens, n)`` makes one greedy call of ``n`` new tokens and returns an
    :class:`Output`; the joining of per-pass pieces happens in ``finish`` (untimed).
    ``full_resid(tokens)`` gives every layer's residual stream output of one uncached forward
    pass, for the check. ``skipped`` says why a scenario is absent.
    """

    run: dict[str, Callable[[Tensor, int], Any]]
    finish: Callable[[Any], Output]
    full_resid: Callable[[Tensor], list[Tensor]]
    info: dict[str, Any]
    skipped: dict[str, str]


def join(raw: Any) -> Output:
    """Tokens alone, or tokens and per-pass pieces per layer joined along positions."""
    if isinstance(raw, Tensor):
        return Output(raw)
    out, kept = raw
    return Output(out, [torch.cat(list(pieces), dim=1) for pieces in kept])


def hooked_system(
    model: Any,
    n_layers: int,
    vector: Tensor,
    greedy: dict[str, Any],
    info: dict[str, Any],
    no_cache: str | None = None,
) -> InterpSystem:
    """The scenarios through TransformerLens's hook API, which kvlens and TransformerLens 2.18 and
    4.3 share: ``model.hooks(fwd_hooks=...)`` around ``model.generate(..., **greedy)``, and
    ``generate(return_cache=True, names_filter=...)`` unless ``no_cache`` says why not."""
    names = resid_post_names(n_layers)

    def plain(tokens: Tensor, n: int) -> Tensor:
        return model.generate(tokens, max_new_tokens=n, **greedy)

    def add(resid: Tensor, hook: Any) -> Tensor:
        return resid + vector

    def steer(tokens: Tensor, n: int) -> Tensor:
        with model.hooks(fwd_hooks=[(f"blocks.{STEER_LAYER}.hook_resid_post", add)]):
            return model.generate(tokens, max_new_tokens=n, **greedy)

    def keeper(store: list[Tensor]) -> Callable[..., None]:
        def keep(resid: Tensor, hook: Any) -> None:
            store.append(resid.detach())

        return keep

    def record(tokens: Tensor, n: int) -> tuple[Tensor, list[list[Tensor]]]:
        kept: list[list[Tensor]] = [[] for _ in names]
        with model.hooks(fwd_hooks=[(name, keeper(kept[i])) for i, name in enumerate(names)]):
            out = model.generate(tokens, max_new_tokens=n, **greedy)
        return out, kept

    def cache(names_filter: Any) -> Callable[[Tensor, int], Any]:
        def call(tokens: Tensor, n: int) -> Any:
            return model.generate(
                tokens, max_new_tokens=n, return_cache=True, names_filter=names_filter, **greedy
            )

        return call

    def finish(raw: Any) -> Output:
        if isinstance(raw, tuple) and not isinstance(raw[1], list):  # (tokens, ActivationCache)
            out, acts = raw
            return Output(out, [acts[name] for name in names], n_names=len(list(acts.keys())))
        return join(raw)

    def full_resid(tokens: Tensor) -> list[Tensor]:
        _, acts = model.run_with_cache(tokens, names_filter=names)
        return [acts[name] for name in names]

    run: dict[str, Callable[[Tensor, int], Any]] = {
        "plain": plain,
        "steer": steer,
        "record": record,
    }
    skipped: dict[str, str] = {}
    if no_cache is None:
        run.update(cache=cache(names), cache_all=cache(None))
    else:
        skipped.update(cache=no_cache, cache_all=no_cache)
    return InterpSystem(run, finish, full_resid, info, skipped)


def check(system: InterpSystem, scenario: str, out: Output, spec: dict[str, Any]) -> dict:
    """Shapes and values of the last call's output, against an uncached forward pass."""
    batch, prompt, new = spec["batch"], spec["prompt"], spec["new_tokens"]
    result: dict[str, Any] = {"tokens_shape": list(out.tokens.shape)}
    ok = tuple(out.tokens.shape) == (batch, prompt + new)
    if out.acts is not None:
        shape = spec["shape"]
        # The last new token is sampled and, by hooks, never run through the model: prompt +
        # new - 1 positions. A return_cache may run it too (one more pass): prompt + new.
        positions = out.acts[0].shape[1]
        result["acts_layers"] = len(out.acts)
        result["acts_shape"] = list(out.acts[0].shape)
        result["acts_include_last_token"] = positions == prompt + new
        want = [batch, positions, shape["d_model"]]
        ok &= positions in (prompt + new - 1, prompt + new)
        ok &= len(out.acts) == shape["n_layers"] and all(list(a.shape) == want for a in out.acts)
        if ok:
            reference = system.full_resid(out.tokens[:, :positions])
            pairs = list(zip(out.acts, reference, strict=True))
            diffs = [float((a - r).abs().max()) for a, r in pairs]
            scale = max(float(r.abs().max()) for r in reference)
            result["max_abs_diff_vs_uncached_forward"] = max(diffs)
            # Where they differ: the prompt's positions (prefill) or the generated ones (decode).
            result["max_abs_diff_prompt_positions"] = max(
                float((a[:, :prompt] - r[:, :prompt]).abs().max()) for a, r in pairs
            )
            result["max_abs_diff_generated_positions"] = max(
                float((a[:, prompt:] - r[:, prompt:]).abs().max()) for a, r in pairs
            )
            result["max_abs_value"] = scale
            ok &= max(diffs) <= 1e-3 * max(scale, 1.0)
    if out.n_names is not None:
        result["cache_names"] = out.n_names
    result["ok"] = bool(ok)
    return result


def more_calls(times: list[float], spec: dict[str, Any]) -> bool:
    """Whether to time another call: ``repeats`` at least; then, while the calls so far
    disagree by more than ``spread`` (another process took the machine during one), more, up
    to ``max_repeats``, so the median is of undisturbed calls."""
    if len(times) < spec["repeats"]:
        return True
    if len(times) >= spec.get("max_repeats", spec["repeats"]):
        return False
    return max(times) > spec.get("spread", 1.25) * min(times)


def measure(system: InterpSystem, spec: dict[str, Any]) -> None:
    """Warm-up, ``repeats`` timed calls, the check; one ``result`` record."""
    scenario, batch, new = spec["scenario"], spec["batch"], spec["new_tokens"]
    where = {"scenario": scenario, "batch": batch}
    if scenario in system.skipped:
        emit("result", **where, status="skipped: " + system.skipped[scenario])
        return
    call = system.run[scenario]
    tokens = prompt_tokens(spec["shape"]["d_vocab"], batch, spec["prompt"], spec["seed"])
    read_before = read_rate()
    times: list[float] = []
    status, raw, warm_s = "ok", None, None
    try:
        with time_limit(spec["timeout_s"]), torch.no_grad():
            start = time.perf_counter()
            raw = call(tokens, new)  # the warm-up: one-time costs stay out of the timed calls
            warm_s = time.perf_counter() - start
            while more_calls(times, spec):
                raw = None  # the previous call's activations are freed before the next
                release_memory()
                start = time.perf_counter()
                raw = call(tokens, new)
                times.append(time.perf_counter() - start)
    except TimeLimit:
        status = f"cut at {spec['timeout_s']:.0f} s after {len(times)} timed calls"
    except Exception as exc:  # a peer that refuses the call: its message is the result
        status = f"error: {type(exc).__name__}: {str(exc)[:300]}"
        raw = None
    record: dict[str, Any] = {**where, "status": status, "times_s": times}
    if times:
        record["ms_per_token"] = 1e3 * statistics.median(times) / new
        record["ms_per_token_min"] = 1e3 * min(times) / new
    record["warm_s"] = warm_s
    if raw is not None:
        with torch.no_grad():
            out = system.finish(raw)
            record["check"] = check(system, scenario, out, spec)
        record["new_tokens"] = out.tokens[:, spec["prompt"] :].tolist()
    record["peak_rss_mb"] = status_mb("VmHWM")
    record["read_gb_s_beside"] = [read_before, read_rate()]
    emit("result", **record)


def main(build: Callable[[dict[str, Any]], InterpSystem]) -> None:
    """Load the model the JSON spec in ``argv[1]`` names and measure its scenario and batch."""
    spec, system = start(build)
    measure(system, spec)
