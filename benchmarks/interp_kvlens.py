"""Worker of ``bench_interp.py`` for kvlens: one scenario at one batch size, in a fresh process.

Loads the benchmark's weights folder with ``HookedTransformer.from_pretrained_no_processing`` (the
checkpoint's weights as they are, as the peers run them) and generates greedily with
``generate(..., do_sample=False, stop_at_eos=False, verbose=False)``:

- ``steer``: ``with model.hooks(fwd_hooks=[("blocks.15.hook_resid_post", add)])``, ``add``
  returning ``resid + vector``;
- ``record``: one hook per layer on ``blocks.{i}.hook_resid_post`` appending the tensor it is
  given (detached) to that layer's list;
- ``cache`` / ``cache_all``: ``generate(..., return_cache=True, names_filter=...)`` returning
  ``(tokens, ActivationCache)``, where this kvlens has it (read from ``generate``'s signature);
  otherwise the rows are skipped with a note.

Usage (normally through bench_interp.py)::

    .venv/bin/python benchmarks/interp_kvlens.py '<JSON spec>'
"""

from __future__ import annotations

import inspect
from importlib.metadata import version
from typing import Any

import torch
from torch import Tensor

import kvlens
from generate_harness import module_info
from interp_harness import (
    STEER_LAYER,
    InterpSystem,
    Output,
    main,
    resid_post_names,
    steering_vector,
)


def build(spec: dict[str, Any]) -> InterpSystem:
    model = kvlens.HookedTransformer.from_pretrained_no_processing(spec["folder"], progress=False)
    model.eval()
    n_layers = model.cfg.n_layers
    names = resid_post_names(n_layers)
    vector = steering_vector(model.cfg.d_model, spec["seed"], spec["steer_scale"])
    greedy = dict(do_sample=False, stop_at_eos=False, verbose=False, return_type="tokens")

    def plain(tokens: Tensor, n: int) -> Tensor:
        return model.generate(tokens, max_new_tokens=n, **greedy)

    def add(resid: Tensor, hook: Any) -> Tensor:
        return resid + vector

    def steer(tokens: Tensor, n: int) -> Tensor:
        with model.hooks(fwd_hooks=[(f"blocks.{STEER_LAYER}.hook_resid_post", add)]):
            return model.generate(tokens, max_new_tokens=n, **greedy)

    def record(tokens: Tensor, n: int) -> tuple[Tensor, list[list[Tensor]]]:
        kept: list[list[Tensor]] = [[] for _ in range(n_layers)]

        def keeper(store: list[Tensor]) -> Any:
            def keep(resid: Tensor, hook: Any) -> None:
                store.append(resid.detach())

            return keep

        hooks = [(name, keeper(kept[i])) for i, name in enumerate(names)]
        with model.hooks(fwd_hooks=hooks):
            out = model.generate(tokens, max_new_tokens=n, **greedy)
        return out, kept

    def cache(names_filter: Any) -> Any:
        def call(tokens: Tensor, n: int) -> Any:
            return model.generate(
                tokens, max_new_tokens=n, return_cache=True, names_filter=names_filter, **greedy
            )

        return call

    def finish(raw: Any) -> Output:
        if isinstance(raw, Tensor):
            return Output(raw)
        out, kept = raw
        if isinstance(kept, list):  # record: per-pass pieces, joined along positions
            return Output(out, [torch.cat(pieces, dim=1) for pieces in kept])
        return Output(out, [kept[name] for name in names], n_names=len(kept.keys()))

    def full_resid(tokens: Tensor) -> list[Tensor]:
        _, acts = model.run_with_cache(tokens, names_filter=names)
        return [acts[name] for name in names]

    run = {"plain": plain, "steer": steer, "record": record}
    skipped = {}
    if "return_cache" in inspect.signature(model.generate).parameters:
        run.update(cache=cache(names), cache_all=cache(None))
    else:
        note = "this kvlens's generate has no return_cache argument"
        skipped.update(cache=note, cache_all=note)
    info = {"kvlens": version("kvlens"), "kvlens_file": kvlens.__file__, **module_info(model)}
    return InterpSystem(run, finish, full_resid, info, skipped)


if __name__ == "__main__":
    main(build)
