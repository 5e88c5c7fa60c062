"""Moving or casting the model keeps ``model.cfg`` (and the caches built from it) in step."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from tests.helpers import make_hf_model
from tests.tiny_models import tiny_llama_with_tokenizer

from kvlens import KeyValueCache, ModelConfig
from kvlens.model import HookedTransformer

PROMPT = "The cat sat on the"


def tiny(**changes: object) -> HookedTransformer:
    cfg = ModelConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, n_ctx=16, d_vocab=32, **changes)  # type: ignore[arg-type]
    torch.manual_seed(0)
    return HookedTransformer(cfg).eval()


def float_dtypes(model: HookedTransformer) -> set[torch.dtype]:
    tensors = [*model.parameters(), *model.buffers()]
    return {t.dtype for t in tensors if t.is_floating_point()}


MOVES: dict[str, tuple[Callable[[HookedTransformer], object], torch.dtype]] = {
    "to(dtype)": (lambda m: m.to(torch.float64), torch.float64),
    "to(dtype=)": (lambda m: m.to(dtype=torch.float16), torch.float16),
    "to(device, dtype)": (lambda m: m.to("cpu", torch.bfloat16), torch.bfloat16),
    "to(device=, dtype=)": (lambda m: m.to(device="cpu", dtype=torch.float64), torch.float64),
    "to(tensor)": (lambda m: m.to(torch.zeros((), dtype=torch.float16)), torch.float16),
    "half()": (lambda m: m.half(), torch.float16),
    "double()": (lambda m: m.double(), torch.float64),
    "bfloat16()": (lambda m: m.bfloat16(), torch.bfloat16),
    "double().float()": (lambda m: m.double().float(), torch.float32),
}


@pytest.mark.parametrize("move", MOVES, ids=list(MOVES))
def test_dtype_moves_update_cfg_dtype_and_new_caches(move):
    model = tiny()
    apply, dtype = MOVES[move]
    assert apply(model) is model
    assert model.cfg.dtype == dtype
    assert float_dtypes(model) == {dtype}
    assert model.cfg.device is None  # still torch's default device
    cache = KeyValueCache.init_cache(model.cfg, model.cfg.device, 1)
    assert cache[0].dtype == dtype


@pytest.mark.parametrize(
    "move",
    [
        lambda m: m.cpu(),
        lambda m: m.to("cpu"),
        lambda m: m.to(torch.device("cpu")),
        lambda m: m.float(),
    ],
    ids=["cpu()", "to('cpu')", "to(device)", "float()"],
)
def test_moves_that_change_nothing_leave_cfg_alone(move):
    model = tiny()
    cfg = model.cfg
    move(model)
    assert model.cfg == cfg


def test_double_generates_what_a_model_built_in_float64_generates():
    model = tiny_llama_with_tokenizer()
    built = HookedTransformer(model.cfg.replace(dtype=torch.float64), tokenizer=model.tokenizer)
    built.load_state_dict(model.state_dict())  # the same float32 weights, widened
    model.double()
    assert model.cfg == built.cfg
    kw = dict(max_new_tokens=8, do_sample=False, stop_at_eos=False, verbose=False)
    assert model.generate(PROMPT, **kw) == built.generate(PROMPT, **kw)
    tokens = model.to_tokens(PROMPT)
    assert torch.equal(model(tokens), built(tokens))
    cache = model.prefill(tokens)
    assert cache[0].dtype == torch.float64
    assert torch.equal(cache[0].past_keys, built.prefill(tokens)[0].past_keys)


def test_bfloat16_then_generate_builds_a_bfloat16_cache():
    model = tiny_llama_with_tokenizer().bfloat16()
    seen = []
    real_init = KeyValueCache.init_cache

    def spy(cfg, *args, **kwargs):
        cache = real_init(cfg, *args, **kwargs)
        seen.append(cache[0].dtype)
        return cache

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(KeyValueCache, "init_cache", spy)
        model.generate(PROMPT, max_new_tokens=3, do_sample=False, verbose=False)
    assert seen == [torch.bfloat16]


def test_device_moves_update_cfg_device():
    model = tiny()
    model.to("meta")
    assert model.cfg.device == "meta"
    assert all(p.device.type == "meta" for p in model.parameters())
    cache = KeyValueCache.init_cache(model.cfg, model.cfg.device, 1, capacity=4)
    assert cache[0].past_keys.device.type == "meta"
    model.to_empty(device="cpu")
    assert model.cfg.device == "cpu"
    assert model.cfg.dtype == torch.float32


def test_a_model_loaded_on_a_device_keeps_its_device_name():
    model = tiny(device="cpu")
    model.double()
    assert model.cfg.device == "cpu"
    assert model.cfg.dtype == torch.float64


def test_multi_device_model_survives_moves():
    model = tiny(n_devices=2)
    tokens = torch.arange(6)[None]
    expected = model(tokens).double()
    model.double()
    assert model.cfg.n_devices == 2 and model.cfg.dtype == torch.float64
    assert torch.allclose(model(tokens), expected, atol=1e-5)
    model.to("meta")
    assert model.cfg.device == "meta" and model.cfg.n_devices == 2
    assert all(p.device.type == "meta" for p in model.parameters())
    model.to_empty(device="cpu")
    assert model.cfg.device == "cpu"
    assert {p.device for p in model.parameters()} == {torch.device("cpu")}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_and_back():
    model = tiny_llama_with_tokenizer()
    kw = dict(max_new_tokens=4, do_sample=False, stop_at_eos=False, verbose=False)
    expected = model.generate(PROMPT, **kw)
    model.cuda()
    assert model.cfg.device == "cuda:0"
    assert model.generate(PROMPT, **kw) == expected
    assert model.prefill(PROMPT)[0].past_keys.device.type == "cuda"
    model.cpu()
    assert model.cfg.device == "cpu"
    assert model.generate(PROMPT, **kw) == expected


@torch.no_grad()
def test_a_cache_of_another_dtype_or_device_is_refused_naming_both():
    model = HookedTransformer.from_hf_model(make_hf_model("llama"))
    old = KeyValueCache.init_cache(model.cfg, model.cfg.device, 1)
    model.double()
    tokens = torch.tensor([[1, 2, 3]])
    with pytest.raises(TypeError, match=r"layer 0 stores torch.float32.*computes in torch.float64"):
        model(tokens, past_kv_cache=old)
    assert old.seq_len == 0 and old.previous_attention_mask.shape == (1, 0)
    elsewhere = KeyValueCache.init_cache(model.cfg, "meta", 1)
    with pytest.raises(ValueError, match=r"layer 0 is on meta.*layer 0 is on cpu"):
        model(tokens, past_kv_cache=elsewhere)
    fresh = KeyValueCache.init_cache(model.cfg, model.cfg.device, 1)
    model(tokens, past_kv_cache=fresh)
    assert fresh[0].dtype == torch.float64 and fresh.seq_len == 3
