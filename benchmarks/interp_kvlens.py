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

import kvlens
from generate_harness import module_info
from interp_harness import InterpSystem, hooked_system, main, steering_vector


def build(spec: dict[str, Any]) -> InterpSystem:
    model = kvlens.HookedTransformer.from_pretrained_no_processing(spec["folder"], progress=False)
    model.eval()
    vector = steering_vector(model.cfg.d_model, spec["seed"], spec["steer_scale"])
    greedy = dict(do_sample=False, stop_at_eos=False, verbose=False, return_type="tokens")
    info = {"kvlens": version("kvlens"), "kvlens_file": kvlens.__file__, **module_info(model)}
    no_cache = None
    if "return_cache" not in inspect.signature(model.generate).parameters:
        no_cache = "this kvlens's generate has no return_cache argument"
    return hooked_system(model, model.cfg.n_layers, vector, greedy, info, no_cache)


if __name__ == "__main__":
    main(build)
