"""One native call per decoder layer: bitwise equal to the op-by-op path, and only where safe."""

from __future__ import annotations

import pytest
import torch
from tests.helpers import make_hf_model, padding_mask

import kvlens.components.decode_plan as plan_module
from kvlens import HookedTransformer, KeyValueCache
from kvlens.kernels import ACTIVATIONS, build
from kvlens.kernels.layer import LayerKind, LayerWeights, decode_layer

pytestmark = pytest.mark.skipif(not build.available(), reason="native kernels not built here")

FAMILIES = ["llama", "mistral", "qwen2", "gpt2", "pythia"]  # pythia: parallel, partial rotary
_models: dict[str, HookedTransformer] = {}


def model_of(family: str) -> HookedTransformer:
    if family not in _models:
        _models[family] = HookedTransformer.from_hf_model(make_hf_model(family)).eval()
    return _models[family]


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Records each call of the native layer: True where it ran, False where it declined."""
    calls: list[bool] = []
    original = plan_module.decode_layer

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = original(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(plan_module, "decode_layer", spy)
    return calls


def identity(x: torch.Tensor, hook: object) -> torch.Tensor:
    return x


def decode(
    model: HookedTransformer,
    batch: int = 3,
    side: str = "left",
    capacity: int = 32,
    hooked: bool = False,
    freeze_after_prompt: bool = False,
) -> tuple[torch.Tensor, KeyValueCache]:
    """Logits of 4 decode steps after a padded 6-token prompt, and the cache they leave."""
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.cfg.d_vocab, (batch, 6), generator=gen)
    steps = torch.randint(0, model.cfg.d_vocab, (batch, 4), generator=gen)
    cache = KeyValueCache.init_cache(model.cfg, None, batch, capacity)
    # An identity hook inside every block (its input and output hooks run around the native call)
    # sends the block down the op-by-op path.
    hooks = [(lambda name: name.endswith("attn.hook_z"), identity)] if hooked else []
    outs = []
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        model(prompt, past_kv_cache=cache, attention_mask=padding_mask(batch, 6, side))
        if freeze_after_prompt:
            cache.freeze()
        for i in range(4):
            outs.append(model(steps[:, i : i + 1], past_kv_cache=cache))
    return torch.stack(outs), cache


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["none", "left", "right"])
def test_native_layer_is_bitwise_the_op_by_op_path(
    family: str, side: str, taken: list[bool]
) -> None:
    model = model_of(family)
    native, native_cache = decode(model, side=side)
    assert taken == [True] * 4 * model.cfg.n_layers
    taken.clear()
    ops, ops_cache = decode(model, side=side, hooked=True)
    assert taken == []
    assert torch.equal(native, ops)
    for mine, theirs in zip(native_cache, ops_cache, strict=True):
        assert mine.length == theirs.length == 10
        assert torch.equal(mine.past_keys, theirs.past_keys)
        assert torch.equal(mine.past_values, theirs.past_values)


@pytest.mark.parametrize("freeze", [False, True])
def test_native_layer_grows_and_respects_a_frozen_cache(freeze: bool, taken: list[bool]) -> None:
    model = model_of("llama")
    # Capacity 0: the native path's first claims grow the storage.
    native, native_cache = decode(model, batch=2, capacity=0, freeze_after_prompt=freeze)
    ops, ops_cache = decode(model, batch=2, capacity=0, freeze_after_prompt=freeze, hooked=True)
    assert all(taken) and len(taken) == 4 * model.cfg.n_layers
    assert torch.equal(native, ops)
    assert native_cache.seq_len == ops_cache.seq_len == (6 if freeze else 10)
    for mine, theirs in zip(native_cache, ops_cache, strict=True):
        assert torch.equal(mine.past_keys, theirs.past_keys)


@pytest.mark.parametrize(
    "hook_name",
    [
        "blocks.0.hook_resid_mid",
        "blocks.0.ln1.hook_normalized",
        "blocks.0.attn.hook_k",
        "blocks.0.attn.hook_pattern",
        "blocks.0.attn.hook_z",
        "blocks.0.mlp.hook_post",
    ],
)
def test_any_hook_in_a_block_takes_it_off_the_native_path(
    hook_name: str, taken: list[bool]
) -> None:
    model = model_of("mistral")
    seen: list[tuple[int, ...]] = []

    def record(x: torch.Tensor, hook: object) -> None:
        seen.append(tuple(x.shape))

    cache = KeyValueCache.init_cache(model.cfg, None, 1, 16)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), past_kv_cache=cache)
        taken.clear()
        model.run_with_hooks(
            torch.tensor([[4]]), past_kv_cache=cache, fwd_hooks=[(hook_name, record)]
        )
    assert len(seen) == 1  # the hook saw the decode step
    assert taken == [True] * (model.cfg.n_layers - 1)  # every other block stayed native


def test_torch_module_hooks_and_autograd_take_the_op_by_op_path(taken: list[bool]) -> None:
    model = model_of("qwen2")
    cache = KeyValueCache.init_cache(model.cfg, None, 1, 16)
    fired: list[str] = []
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), past_kv_cache=cache)
        handle = model.blocks[1].mlp.register_forward_hook(lambda *_: fired.append("mlp"))
        model(torch.tensor([[4]]), past_kv_cache=cache)
        handle.remove()
        global_handle = torch.nn.modules.module.register_module_forward_hook(
            lambda *_: fired.append("global")
        )
        try:
            model(torch.tensor([[5]]), past_kv_cache=cache)
        finally:
            global_handle.remove()
    assert fired.count("mlp") == 1 and "global" in fired
    assert taken == [True] * (model.cfg.n_layers - 1)  # the hooked MLP's block was op by op
    taken.clear()
    logits = model(torch.tensor([[6]]), past_kv_cache=cache)  # gradients tracked
    assert logits.requires_grad and taken == [False] * model.cfg.n_layers


def test_a_replaced_activation_takes_the_op_by_op_path(taken: list[bool]) -> None:
    model = HookedTransformer.from_hf_model(make_hf_model("gpt2")).eval()
    native, _ = decode(model, side="none")
    for block in model.blocks:
        block.mlp.act = torch.nn.functional.relu  # an experiment: the native layer must not run
    relu, _ = decode(model, side="none")
    assert taken.count(True) == 4 * model.cfg.n_layers  # the first run only
    assert not torch.equal(native, relu)


def test_more_rows_than_the_kernel_takes_are_declined_and_still_right(taken: list[bool]) -> None:
    model = model_of("llama")
    native, _ = decode(model, batch=33, side="none")
    assert taken and not any(taken)
    ops, _ = decode(model, batch=33, side="none", hooked=True)
    assert torch.equal(native, ops)


def _layer_inputs(
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, LayerWeights, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype)

    weights = LayerWeights(
        rand(16), None, rand(16, 32), None, rand(16, 16), None, rand(16), None, rand(16, 64),
        None, rand(32, 16), None,
    )  # fmt: skip
    return rand(1, 1, 16), weights, rand(1, 2, 8, 4), rand(1, 2, 8, 4)


RMS_GATED = LayerKind(layer_norm=False, act=None, parallel=False, eps=1e-5)


def test_decode_layer_declines_without_writing() -> None:
    x, weights, keys, values = _layer_inputs()
    args = (RMS_GATED, 4, 4)  # kind, n_heads, d_head: width (4 + 2 * 2) * 4 = 32

    def attempt(**changes: object) -> torch.Tensor | None:
        call: dict[str, object] = {
            "x": x, "weights": weights, "keys": keys, "values": values, "pos": 3, "mask": None,
            "rotary": None,
        }  # fmt: skip
        call.update(changes)
        before = keys.clone(), values.clone()
        out = decode_layer(
            call["x"], call["weights"], *args, call["keys"], call["values"],  # type: ignore[arg-type]
            call["pos"], call["mask"], call["rotary"],  # type: ignore[arg-type]
            scale=args[-1] ** -0.5,  # type: ignore[operator]
        )  # fmt: skip
        if out is None:
            assert torch.equal(keys, before[0]) and torch.equal(values, before[1])
        return out

    assert attempt() is not None  # the valid call runs
    assert attempt(x=x.double()) is None
    assert attempt(x=torch.randn(1, 2, 16)) is None  # two new tokens
    assert attempt(x=torch.randn(1, 1, 32)[..., ::2]) is None  # not contiguous
    assert attempt(pos=8) is None  # past the capacity
    assert attempt(weights=weights._replace(w_o=torch.randn(16, 15))) is None
    assert attempt(weights=weights._replace(b_out=torch.randn(15))) is None
    assert attempt(mask=torch.ones(1, 1, 1, 3, dtype=torch.bool)) is None  # pos + 1 keys
    assert attempt(rotary=(torch.randn(1, 1, 1, 3), torch.randn(1, 1, 1, 3), False)) is None
    assert attempt(weights=weights._replace(w_qkv=weights.w_qkv.requires_grad_())) is None
    assert attempt(weights=weights._replace(ln1_b=torch.randn(16))) is None  # RMSNorm: no bias
    assert attempt(weights=weights._replace(w_in=torch.randn(16, 32))) is None  # not 2 * d_mlp
    assert attempt(weights=weights._replace(w_qkv=torch.randn(32))) is None
    assert attempt(x=torch.randn(1, 16)) is None


@pytest.mark.parametrize(
    ("kind", "rotary"),
    [
        (RMS_GATED, True),  # Llama, with every bias
        (LayerKind(layer_norm=True, act=ACTIVATIONS["gelu_new"], parallel=False, eps=1e-5), False),
        (LayerKind(layer_norm=True, act=ACTIVATIONS["gelu"], parallel=True, eps=1e-5), True),
    ],
    ids=["llama", "gpt2", "neox"],
)
def test_decode_layer_matches_a_float64_reference(kind: LayerKind, rotary: bool) -> None:
    """Against the block written out in float64 torch, with every bias present."""
    x, weights, keys, values = _layer_inputs()
    gen = torch.Generator().manual_seed(1)
    gated = kind.act is None
    in_width = 64 if gated else 32
    weights = weights._replace(
        b_qkv=torch.randn(32, generator=gen),
        b_o=torch.randn(16, generator=gen),
        w_in=torch.randn(16, in_width, generator=gen),
        b_in=torch.randn(in_width, generator=gen),
        b_out=torch.randn(16, generator=gen),
    )
    if kind.layer_norm:
        weights = weights._replace(
            ln1_b=torch.randn(16, generator=gen), ln2_b=torch.randn(16, generator=gen)
        )
    angles = torch.rand(1, 1, 1, 2, generator=gen) * 6
    cos, sin = angles.cos(), angles.sin()
    reference_keys, reference_values = keys.double().clone(), values.double().clone()
    angles_arg = (cos, sin, False) if rotary else None
    out = decode_layer(x, weights, kind, 4, 4, keys, values, 3, None, angles_arg, scale=4**-0.5)
    assert out is not None

    w = LayerWeights(*(None if t is None else t.double() for t in weights))
    x64, cos64, sin64 = x.double()[:, 0], cos.double()[0, 0, 0], sin.double()[0, 0, 0]

    def norm(t: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if kind.layer_norm:
            return torch.nn.functional.layer_norm(t, (16,), scale, bias, 1e-5)
        return t / (t.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * scale

    def rotate(t: torch.Tensor) -> torch.Tensor:  # [heads, 4], the first 2 * 2 dims rotated
        if not rotary:
            return t
        lo, hi = t[:, :2], t[:, 2:4]
        return torch.cat([lo * cos64 - hi * sin64, hi * cos64 + lo * sin64], -1)

    qkv = (norm(x64, w.ln1_w, w.ln1_b) @ w.w_qkv + w.b_qkv).view(8, 4)
    q, k, v = rotate(qkv[:4]), rotate(qkv[4:6]), qkv[6:]
    reference_keys[0, :, 3], reference_values[0, :, 3] = k, v
    scores = torch.einsum("hd,hpd->hp", q, reference_keys[0].repeat_interleave(2, 0)[:, :4]) / 2
    z = torch.einsum(
        "hp,hpd->hd", scores.softmax(-1), reference_values[0].repeat_interleave(2, 0)[:, :4]
    )
    attn_out = z.reshape(1, 16) @ w.w_o + w.b_o
    mlp_in = x64 if kind.parallel else x64 + attn_out
    pre = norm(mlp_in, w.ln2_w, w.ln2_b) @ w.w_in + w.b_in
    if gated:
        post = torch.nn.functional.silu(pre[:, :32]) * pre[:, 32:]
    else:
        approximate = "tanh" if kind.act == ACTIVATIONS["gelu_new"] else "none"
        post = torch.nn.functional.gelu(pre, approximate=approximate)
    expected = x64 + attn_out + post @ w.w_out + w.b_out
    torch.testing.assert_close(out[:, 0].double(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(keys.double(), reference_keys, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values.double(), reference_values, rtol=1e-5, atol=1e-5)
