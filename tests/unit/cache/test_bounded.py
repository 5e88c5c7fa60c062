"""A bounded cache keeps only what sliding windows can still see, and gives the same numbers."""

from __future__ import annotations

import pytest
import torch

from kvlens import HookedTransformer, KeyValueCache, ModelConfig
from kvlens.cache.entry import BOUNDED_SLACK
from kvlens.cache.shared import SharedPrefixCache

WINDOW = 5


def tiny() -> HookedTransformer:
    cfg = ModelConfig(
        n_layers=2, d_model=32, n_heads=4, d_head=8, n_key_value_heads=2, d_mlp=48, n_ctx=512,
        d_vocab=50, act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
        gated_mlp=True, attn_qkv_bias=False, attn_out_bias=False, mlp_bias=False,
        window_size=WINDOW, attn_types=("local", "global"),
    )  # fmt: skip
    torch.manual_seed(0)
    return HookedTransformer(cfg).eval()


MODEL = tiny()


def run(cache: KeyValueCache, tokens: torch.Tensor, chunks: list[int], **kwargs) -> torch.Tensor:
    """Logits of ``tokens`` fed in chunks of the given sizes (the rest one at a time)."""
    out, at = [], 0
    with torch.no_grad():
        for size in chunks:
            out.append(MODEL(tokens[:, at : at + size], past_kv_cache=cache, **kwargs))
            at += size
            kwargs.pop("attention_mask", None)
        while at < tokens.shape[1]:
            out.append(MODEL(tokens[:, at : at + 1], past_kv_cache=cache))
            at += 1
    return torch.cat(out, dim=1)


def tokens(batch: int = 2, pos: int = 150, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 50, (batch, pos), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("hooked", [False, True], ids=["native", "op_by_op"])
@pytest.mark.parametrize("chunks", [[7], [3, 4, 9], [100]])
def test_bounded_equals_unbounded(hooked: bool, chunks: list[int]) -> None:
    ids = tokens()
    mask = torch.ones(2, chunks[0], dtype=torch.long)
    mask[1, :2] = 0  # a left-padded row
    expected = run(KeyValueCache.init_cache(MODEL.cfg, None, 2), ids, chunks, attention_mask=mask)
    bounded = KeyValueCache.init_cache(MODEL.cfg, None, 2, bounded=True)
    hooks = [("blocks.0.hook_resid_pre", lambda x, hook: x)] if hooked else []
    with MODEL.hooks(fwd_hooks=hooks):
        got = run(bounded, ids, chunks, attention_mask=mask)
    assert torch.allclose(got, expected, atol=1e-5)
    with torch.no_grad():
        full_mask = torch.cat((mask, torch.ones(2, 150 - chunks[0], dtype=torch.long)), 1)
        whole = MODEL(ids, attention_mask=full_mask)
    assert torch.allclose(got, whole, atol=1e-4)


def test_the_local_layer_holds_at_most_its_window_and_a_slack() -> None:
    bounded = KeyValueCache.init_cache(MODEL.cfg, None, 2, capacity=400, bounded=True)
    unbounded = KeyValueCache.init_cache(MODEL.cfg, None, 2)
    ids = tokens(pos=300)
    run(bounded, ids, [10])
    run(unbounded, ids, [10])
    local, glob = bounded[0], bounded[1]
    assert local.bound == WINDOW and glob.bound is None
    assert local.length == glob.length == 300
    assert local.capacity <= WINDOW - 1 + BOUNDED_SLACK
    assert local.start > 0 and local.past_keys.shape[1] == 300 - local.start
    assert torch.equal(local.past_keys, unbounded[0].past_keys[:, local.start :])
    assert glob.start == 0 and torch.equal(glob.past_values, unbounded[1].past_values)
    assert bounded.nbytes < unbounded.nbytes


def test_generate_with_a_bounded_cache_gives_the_same_tokens() -> None:
    prompt = tokens(batch=1, pos=6, seed=3)
    kwargs = dict(max_new_tokens=90, do_sample=False, stop_at_eos=False, verbose=False)
    plain = MODEL.generate(prompt, **kwargs)
    cache = KeyValueCache.init_cache(MODEL.cfg, None, 1, bounded=True)
    assert torch.equal(MODEL.generate(prompt, past_kv_cache=cache, **kwargs), plain)
    assert cache[0].start > 0


def test_crop_select_clone_and_refusals() -> None:
    ids = tokens(pos=120)
    cache = KeyValueCache.init_cache(MODEL.cfg, None, 2, bounded=True)
    run(cache, ids[:, :100], [4])
    start = cache[0].start
    with pytest.raises(ValueError, match="dropped the positions before"):
        cache.crop(start)
    assert cache.seq_len == 100  # nothing changed
    copy = cache.clone()
    assert copy[0].start == start and copy[0].bound == WINDOW
    cache.crop(99)
    expected = run(copy.crop(99), ids[:, 99:], [])
    assert torch.allclose(run(cache, ids[:, 99:], []), expected, atol=1e-6)
    cache.select([1, 1])
    assert cache[0].start == start and cache.batch_size == 2
    with pytest.raises(ValueError, match="bounded cache"):
        cache.save("unused.safetensors", MODEL.cfg)
    prefix = KeyValueCache.init_cache(MODEL.cfg, None, 1, bounded=True)
    run(prefix, ids[:1, :100], [4])
    with pytest.raises(ValueError, match="bounded"):
        SharedPrefixCache.from_prefix(prefix.freeze(), 3)
    cache.reset()
    assert cache[0].start == 0 and cache.seq_len == 0


def test_a_failed_pass_leaves_a_bounded_cache_as_it_was() -> None:
    ids = tokens(pos=140)
    cache = KeyValueCache.init_cache(MODEL.cfg, None, 2, bounded=True)
    run(cache, ids[:, :68], [64])  # the next append drops old positions
    clean = cache.clone()

    def boom(x: torch.Tensor, hook: object) -> None:
        raise RuntimeError("boom")

    hooks = MODEL.hooks(fwd_hooks=[("blocks.1.hook_resid_post", boom)])
    with hooks, pytest.raises(RuntimeError), torch.no_grad():
        MODEL(ids[:, 68:72], past_kv_cache=cache)
    assert cache.seq_len == 68
    assert torch.allclose(run(cache, ids[:, 68:], [4]), run(clean, ids[:, 68:], [4]), atol=1e-6)


def test_gradients_through_a_bounded_cache_equal_the_unbounded_ones() -> None:
    ids = tokens(batch=1, pos=80)

    def gradient(bounded: bool) -> torch.Tensor:
        model = tiny()
        cache = KeyValueCache.init_cache(model.cfg, None, 1, bounded=bounded)
        logits = [model(ids[:, :70], past_kv_cache=cache)]  # past the slack: drops positions
        for at in range(70, 80):
            logits.append(model(ids[:, at : at + 1], past_kv_cache=cache))
        torch.cat(logits, dim=1).logsumexp(-1).sum().backward()
        assert (cache[0].start > 0) == bounded  # the bounded cache dropped positions
        grad = model.blocks[0].attn.W_QKV.grad
        assert grad is not None
        return grad

    bounded, unbounded = gradient(True), gradient(False)
    assert torch.allclose(bounded, unbounded, atol=1e-5 * unbounded.abs().max().item())
