"""A model's decode steps give the same logits with the native kernels as with torch alone."""

from __future__ import annotations

import pytest
import torch
from tests.helpers import make_hf_model

from kvlens import HookedTransformer, KeyValueCache, kernels
from kvlens.kernels import build

pytestmark = pytest.mark.skipif(not build.available(), reason="native kernels not built here")


@pytest.mark.parametrize("family", ["llama", "gpt2", "pythia", "mistral", "qwen2"])
def test_decode_with_and_without_native_kernels(family: str, monkeypatch) -> None:
    model = HookedTransformer.from_hf_model(make_hf_model(family))
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 5), generator=torch.Generator().manual_seed(0))
    steps = torch.randint(0, model.cfg.d_vocab, (2, 4), generator=torch.Generator().manual_seed(1))

    def run() -> torch.Tensor:
        cache = KeyValueCache.init_cache(model.cfg, None, 2, 16)
        with torch.no_grad():
            model(tokens, past_kv_cache=cache)
            return torch.stack([model(steps[:, i : i + 1], past_kv_cache=cache) for i in range(4)])

    native = run()
    monkeypatch.setitem(build._state, "lib", None)  # as on a machine with no compiler
    assert kernels.matmul(torch.randn(1, 4), torch.randn(4, 4)) is None
    torch.testing.assert_close(native, run(), rtol=1e-5, atol=1e-5)
