"""The fused decode layer on quantized matrices (``layer.c`` calling ``quant.c``) against the
op-by-op path and the fp32 model holding the dequantized weights; under the kernel tests so that
CI runs it with each compiler it builds the kernels with."""

from __future__ import annotations

import pytest
import torch
from tests.helpers import tokens_for
from tests.unit.test_model_quantization import pair
from torch import Tensor

import kvlens.components.decode_plan as plan_module
from kvlens.cache.cache import KeyValueCache
from kvlens.kernels import build

pytestmark = pytest.mark.skipif(not build.available(), reason="native kernels not built here")


@pytest.mark.parametrize("family", ["gpt2", "pythia", "llama"])
@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q8_0"])
def test_fused_layer_on_blocks(family: str, fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    quantized, dense = pair(family, fmt)
    ran: list[bool] = []
    original = plan_module.decode_layer

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = original(*args, **kwargs)
        ran.append(out is not None)
        return out

    monkeypatch.setattr(plan_module, "decode_layer", spy)
    tokens = tokens_for(21, 3, 9)

    def steps(model, hooked: bool) -> Tensor:  # type: ignore[no-untyped-def]
        cache = KeyValueCache.init_cache(model.cfg, "cpu", batch_size=3)
        hooks = [("blocks.0.mlp.hook_post", lambda x, hook: x)] if hooked else []
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            out = [model(tokens[:, :5], past_kv_cache=cache)[:, -1]]
            out += [model(tokens[:, i : i + 1], past_kv_cache=cache)[:, -1] for i in range(5, 9)]
        return torch.stack(out, 1)

    fused = steps(quantized, hooked=False)
    assert ran and all(ran)
    ran.clear()
    assert torch.equal(fused, steps(quantized, hooked=True))  # block 0 op by op
    assert ran == [True] * 4  # block 1 fused at each of the 4 steps
    # The additions in another order: within fp32 rounding of the logits' scale.
    want = steps(dense, hooked=False)
    torch.testing.assert_close(fused, want, rtol=0, atol=1e-5 * want.abs().max().item())
