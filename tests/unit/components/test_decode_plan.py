"""A block's decode plan: built once, rebuilt after any structural change, and always right."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kvlens.components.block as block_module
import kvlens.components.decode_plan as plan_module
from kvlens import HookedTransformer, KeyValueCache, ModelConfig
from kvlens.kernels import build

pytestmark = pytest.mark.skipif(not build.available(), reason="native kernels not built here")


def tiny(**changes) -> HookedTransformer:
    cfg = ModelConfig(
        n_layers=2, d_model=32, n_heads=4, d_head=8, n_key_value_heads=2, d_mlp=48, n_ctx=96,
        d_vocab=50, act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
        gated_mlp=True, attn_qkv_bias=False, attn_out_bias=False, mlp_bias=False,
    ).replace(**changes)  # fmt: skip
    torch.manual_seed(0)
    return HookedTransformer(cfg).eval()


@pytest.fixture
def counts(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[bool]]:
    """How often plans are built, and each native layer call (True: it ran)."""
    seen: dict[str, list[bool]] = {"built": [], "native": []}
    make, layer = block_module.make_plan, plan_module.decode_layer

    def count_make(block):  # type: ignore[no-untyped-def]
        plan = make(block)
        seen["built"].append(isinstance(plan, plan_module.DecodePlan))
        return plan

    def count_layer(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = layer(*args, **kwargs)
        seen["native"].append(out is not None)
        return out

    monkeypatch.setattr(block_module, "make_plan", count_make)
    monkeypatch.setattr(plan_module, "decode_layer", count_layer)
    return seen


def steps(model: HookedTransformer, n: int = 5, seed: int = 0) -> torch.Tensor:
    """Logits of ``n`` decode steps after a 4-token prompt, one per step."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 4 + n), generator=gen)
    cache = KeyValueCache.init_cache(model.cfg, None, 2)
    with torch.no_grad():
        out = [model(tokens[:, :4], past_kv_cache=cache)[:, -1]]
        for i in range(4, 4 + n):
            out.append(model(tokens[:, i : i + 1], past_kv_cache=cache)[:, -1])
    return torch.stack(out, 1)


def uncached(model: HookedTransformer, n: int = 5, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 4 + n), generator=gen)
    with torch.no_grad():
        return model(tokens)[:, 3:]


def test_the_plan_is_built_once_then_reused(counts) -> None:
    model = tiny()
    steps(model, n=6)
    assert counts["built"] == [True, True]  # one per block, for 12 native decode calls
    assert counts["native"] == [True] * 12
    steps(model, n=3)
    assert counts["built"] == [True, True]


def test_hooks_added_and_removed_rebuild_the_plan(counts) -> None:
    model = tiny()
    native = steps(model)
    with model.hooks(fwd_hooks=[("blocks.1.attn.hook_z", lambda x, hook: x)]):
        assert model.blocks[0].decode_plan is not None
        assert model.blocks[1].decode_plan is None
        assert "blocks.1.attn.hook_z" in str(model.blocks[1].decode_plan_reason)
        hooked = steps(model)
    assert model.blocks[1].decode_plan is not None
    assert torch.equal(native, hooked)
    handle = model.blocks[0].mlp.register_forward_hook(lambda *args: None)
    assert model.blocks[0].decode_plan is None
    assert "torch forward hook on mlp" in str(model.blocks[0].decode_plan_reason)
    handle.remove()
    assert model.blocks[0].decode_plan is not None


def test_a_replaced_parameter_or_submodule_is_what_runs(counts) -> None:
    model = tiny()
    before = steps(model)
    attn = model.blocks[0].attn
    attn.W_QKV = nn.Parameter(attn.W_QKV.detach() * 1.5)
    after = steps(model)
    assert not torch.allclose(before, after, atol=1e-4)
    assert torch.allclose(after, uncached(model), atol=1e-4)
    assert counts["native"] and all(counts["native"])

    class Doubled(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * self.inner(x)

    model.blocks[1].mlp = Doubled(model.blocks[1].mlp)
    assert "mlp has no native form" in str(model.blocks[1].decode_plan_reason)
    assert torch.allclose(steps(model), uncached(model), atol=1e-4)


def test_weights_swapped_under_the_plan_are_what_runs(counts) -> None:
    """The plan checks its weights once; a ``.data`` swap (no structural change) or gradients
    asked of a weight make the native layer decline, never read the old memory."""
    model = tiny()
    steps(model)
    mlp = model.blocks[0].mlp
    mlp.W_gate_in.data = mlp.W_gate_in.data * 1.5
    counts["native"].clear()
    assert torch.allclose(steps(model), uncached(model), atol=1e-4)
    assert counts["native"] == [False, True] * 5  # block 0 declined, block 1 ran
    out = model.blocks[1].attn.W_O_flat  # square: a transposed view keeps the address
    out.data = out.data.T
    counts["native"].clear()
    assert torch.allclose(steps(model), uncached(model), atol=1e-4)
    assert counts["native"] == [False, False] * 5
    model.blocks[1].attn.W_O_flat.requires_grad_(True)
    counts["native"].clear()
    with torch.enable_grad():
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, model.cfg.d_vocab, (2, 5), generator=gen)
        cache = KeyValueCache.init_cache(model.cfg, None, 2)
        model(tokens[:, :4], past_kv_cache=cache)
        model(tokens[:, 4:], past_kv_cache=cache).sum().backward()
    assert counts["native"] == [False, False]
    assert model.blocks[1].attn.W_O_flat.grad is not None


def test_an_attribute_change_reaches_the_plan() -> None:
    model = tiny()
    for block in model.blocks:
        block.ln1.eps = block.ln2.eps = 0.5  # large enough to change the numbers
    plan = model.blocks[0].decode_plan
    assert plan is not None and plan.kind.eps == 0.5
    assert torch.allclose(steps(model), uncached(model), atol=1e-4)
    model.blocks[0].mlp.act = torch.nn.functional.gelu
    assert model.blocks[0].decode_plan is None
    assert torch.allclose(steps(model), uncached(model), atol=1e-4)


@pytest.mark.parametrize("padded", [False, True])
def test_the_native_layer_reads_only_a_sliding_window(counts, padded: bool) -> None:
    model = tiny(window_size=3, attn_types=("local", "global"))
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 50, (2, 14), generator=gen)
    mask = torch.ones(2, 14, dtype=torch.long)
    if padded:
        mask[1, :3] = 0
    cache = KeyValueCache.init_cache(model.cfg, None, 2)
    with torch.no_grad():
        out = [model(tokens[:, :4], past_kv_cache=cache, attention_mask=mask[:, :4])[:, -1]]
        for i in range(4, 14):
            out.append(model(tokens[:, i : i + 1], past_kv_cache=cache)[:, -1])
        whole = model(tokens, attention_mask=mask)[:, 3:]
        # The op-by-op path (a hook on every block) gives the same steps.
        cache = KeyValueCache.init_cache(model.cfg, None, 2)
        with model.hooks(fwd_hooks=[(lambda n: n.endswith("hook_attn_out"), lambda x, hook: x)]):
            ops = [model(tokens[:, :4], past_kv_cache=cache, attention_mask=mask[:, :4])[:, -1]]
            for i in range(4, 14):
                ops.append(model(tokens[:, i : i + 1], past_kv_cache=cache)[:, -1])
    assert counts["native"] and all(counts["native"])
    assert torch.allclose(torch.stack(out, 1), whole, atol=1e-4)
    assert torch.allclose(torch.stack(out, 1), torch.stack(ops, 1), atol=1e-5)
    # The window matters: the same model without it differs.
    with torch.no_grad():
        unwindowed = tiny()(tokens, attention_mask=mask)[:, 3:]
    assert not torch.allclose(whole, unwindowed, atol=1e-3)


@pytest.mark.parametrize("point", ["hook_resid_pre", "hook_resid_post"])
def test_hooks_between_blocks_keep_the_native_layer(counts, point: str) -> None:
    """A hook on a block's input or output runs around the native call: the native layer still
    runs every step, the hook sees every step, and steering there gives what the op-by-op path
    (forced by a hook inside the block) and the uncached pass give."""
    model = tiny()
    gen = torch.Generator().manual_seed(3)
    direction = torch.randn(model.cfg.d_model, generator=gen)
    seen: list[tuple[int, ...]] = []

    def steer(x: torch.Tensor, hook) -> torch.Tensor:  # type: ignore[no-untyped-def]
        seen.append(tuple(x.shape))
        return x + direction

    name = f"blocks.1.{point}"
    with model.hooks(fwd_hooks=[(name, steer)]):
        assert model.blocks[1].decode_plan is not None
        native = steps(model)
        assert counts["native"] == [True] * 10  # 2 blocks x 5 steps
        assert seen == [(2, 4, 32)] + [(2, 1, 32)] * 5
        whole = uncached(model)
    inner = ("blocks.1.hook_mlp_out", lambda x, hook: x)
    with model.hooks(fwd_hooks=[(name, steer), inner]):
        assert model.blocks[1].decode_plan is None
        ops = steps(model)
    assert torch.equal(native, ops)
    assert torch.allclose(native, whole, atol=1e-4)
    assert not torch.allclose(native, steps(model), atol=1e-3)  # the steering did something
