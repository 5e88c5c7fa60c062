"""The native kernels on 1, 2 and 3 threads, on weights large enough to be split (over 256 KB).

What the C promises, and so what is asserted:

- Attention (attention.c) splits keys into fixed chunks of 256 whatever the thread count, and
  merges a head's chunks in one order: its result is bitwise the same on any number of threads.
- The matrix product (matmul.c) splits the columns between threads when they are wide enough
  (``SPLIT_COLUMNS_MIN`` per thread): each column is then summed over all of K in one order, so
  the result is bitwise the one-thread result. Otherwise it splits K and adds the threads' partial
  sums: the rounding depends on the thread count, so the result is compared with a tolerance (and
  must be the same on every run with the same count).
- The fused layer (layer.c) is bitwise the op-by-op path at the same thread count (the promise
  that makes a hook that returns its input change nothing); across thread counts it differs by
  its products' rounding only.

The kernels' thread count is torch's (``torch.set_num_threads``) unless a call names one; the
OpenMP team a region gets is checked too (``kvlens_openmp_threads``), so a pool that silently
stayed at one thread would fail here. A build without OpenMP runs everything on one thread and
passes the same comparisons.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from tests.helpers import make_hf_model

from kvlens import HookedTransformer, KeyValueCache, kernels
from kvlens.kernels import build

pytestmark = pytest.mark.skipif(not build.available(), reason="native kernels not built here")

THREADS = [1, 2, 3]
SINGLE_THREADED = "single-threaded" in kernels.describe()


@pytest.fixture
def torch_threads() -> Iterator[None]:
    """Restores torch's thread count (xdist workers run with one) after the test."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("threads", THREADS)
def test_a_parallel_region_gets_the_threads_asked_for(threads: int) -> None:
    lib = build.library()
    assert lib is not None
    expected = 1 if SINGLE_THREADED else threads
    assert lib.kvlens_openmp_threads(threads) == expected


def float64_product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x.double() @ w.double()).float()


# (rows, d_in, d_out): every weight over the library's one-thread threshold.
K_SPLIT = [(1, 576, 1536), (3, 1536, 576), (8, 576, 960)]  # 3.5 MB, 3.5 MB, 2.2 MB
COLUMN_SPLIT = [(1, 64, 12288), (5, 48, 13000)]  # 3 MB, 2.5 MB: >= 4096 columns per thread


@pytest.mark.parametrize(("rows", "d_in", "d_out"), K_SPLIT + COLUMN_SPLIT)
def test_matmul_on_more_threads_is_the_one_thread_result(rows: int, d_in: int, d_out: int) -> None:
    lim = kernels.limits()
    assert lim is not None and d_in * d_out * 4 > lim.single_thread_bytes
    gen = torch.Generator().manual_seed(d_in + d_out)
    x = torch.randn(rows, d_in, generator=gen)
    w = torch.randn(d_in, d_out, generator=gen)
    one = kernels.matmul(x, w, threads=1)
    assert one is not None
    torch.testing.assert_close(one, float64_product(x, w), rtol=1e-5, atol=1e-4 * d_in**0.5)
    for threads in THREADS[1:]:
        got = kernels.matmul(x, w, threads=threads)
        assert got is not None
        assert torch.equal(got, kernels.matmul(x, w, threads=threads))  # deterministic
        if (rows, d_in, d_out) in COLUMN_SPLIT or SINGLE_THREADED:
            assert torch.equal(got, one), threads
        else:
            torch.testing.assert_close(got, one, rtol=1e-5, atol=1e-5 * d_in**0.5)
            torch.testing.assert_close(got, float64_product(x, w), rtol=1e-5, atol=1e-4 * d_in**0.5)


@pytest.mark.parametrize("threads", THREADS)
def test_matmul_follows_torchs_thread_count(threads: int, torch_threads: None) -> None:
    gen = torch.Generator().manual_seed(threads)
    x, w = torch.randn(2, 1536, generator=gen), torch.randn(1536, 576, generator=gen)
    torch.set_num_threads(threads)
    by_default = kernels.matmul(x, w)
    named = kernels.matmul(x, w, threads=threads)
    assert by_default is not None and named is not None
    assert torch.equal(by_default, named)
    if threads > 1 and not SINGLE_THREADED:  # a K split: the rounding shows the thread count
        assert not torch.equal(by_default, kernels.matmul(x, w, threads=1))


def float64_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1).double(), v.repeat_interleave(group, 1).double()
    scores = (q.double() @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (torch.softmax(scores, -1) @ v).float()


@pytest.mark.parametrize(("batch", "n_heads", "n_kv", "kv_len"), [(1, 9, 3, 1000), (2, 8, 2, 700)])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_is_bitwise_the_same_on_any_thread_count(
    batch: int, n_heads: int, n_kv: int, kv_len: int, masked: bool, torch_threads: None
) -> None:
    gen = torch.Generator().manual_seed(kv_len)
    q = 3 * torch.randn(batch, n_heads, 1, 64, generator=gen)
    k = torch.randn(batch, n_kv, kv_len + 7, 64, generator=gen)[:, :, :kv_len]  # cache views
    v = torch.randn(batch, n_kv, kv_len + 7, 64, generator=gen)[:, :, :kv_len]
    mask = None
    if masked:
        mask = torch.rand(batch, 1, 1, kv_len, generator=gen) > 0.3
        mask[..., -1] = True
    scale = 64**-0.5
    results = {}
    for threads in THREADS:
        results[threads] = kernels.decode_attention(q, k, v, mask, threads, scale=scale)
        torch.set_num_threads(threads)  # the default: torch's count
        by_default = kernels.decode_attention(q, k, v, mask, scale=scale)
        assert by_default is not None and torch.equal(by_default, results[threads])
    one = results[1]
    assert one is not None
    torch.testing.assert_close(one, float64_attention(q, k, v, mask), rtol=1e-4, atol=1e-5)
    for threads in THREADS[1:]:
        assert torch.equal(results[threads], one), threads


# A one-layer model whose every matrix exceeds the one-thread threshold (d_head 64):
# w_qkv 256 x 512 (512 KB), w_o 256 x 256 (256 KB), w_in 256 x 1536 (1.5 MB), w_out 768 x 256.
WIDE = {
    "llama": dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2),
    "gpt2": dict(n_embd=256, n_head=4, n_inner=768),
}
_models: dict[str, HookedTransformer] = {}


def wide_model(family: str) -> HookedTransformer:
    if family not in _models:
        overrides = dict(WIDE[family])
        if family == "llama":
            overrides["intermediate_size"] = 768
            overrides["num_hidden_layers"] = 1
        else:
            overrides["n_layer"] = 1
        model = HookedTransformer.from_hf_model(make_hf_model(family, **overrides)).eval()
        assert model.cfg.d_head == 64
        _models[family] = model
    return _models[family]


def decode_steps(model: HookedTransformer, hooked: bool) -> torch.Tensor:
    """Logits of 3 decode steps of 3 rows after a 40-token prompt (fused layer unless hooked)."""
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, model.cfg.d_vocab, (3, 40), generator=gen)
    steps = torch.randint(0, model.cfg.d_vocab, (3, 3), generator=gen)
    cache = KeyValueCache.init_cache(model.cfg, None, 3, 48)
    # An identity hook inside the block sends it down the op-by-op path (native ops one by one).
    hooks = [("blocks.0.attn.hook_z", lambda x, hook: x)] if hooked else []
    outs = []
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        model(prompt, past_kv_cache=cache)
        for i in range(3):
            outs.append(model(steps[:, i : i + 1], past_kv_cache=cache))
    return torch.cat(outs, 1)


@pytest.mark.parametrize("family", list(WIDE))
def test_fused_layer_on_more_threads(
    family: str, torch_threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kvlens.components.decode_plan as plan_module

    model = wide_model(family)
    fused_calls: list[bool] = []
    original = plan_module.decode_layer

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = original(*args, **kwargs)
        fused_calls.append(out is not None)
        return out

    monkeypatch.setattr(plan_module, "decode_layer", spy)
    fused = {}
    for threads in THREADS:
        torch.set_num_threads(threads)
        fused[threads] = decode_steps(model, hooked=False)
        assert fused_calls and all(fused_calls)  # the fused layer ran
        fused_calls.clear()
        # Bitwise the op-by-op path at the same thread count, whatever the count.
        assert torch.equal(fused[threads], decode_steps(model, hooked=True)), threads
        assert not fused_calls
    torch.set_num_threads(1)
    monkeypatch.setitem(build._state, "lib", None)  # torch alone
    reference = decode_steps(model, hooked=False)
    for threads in THREADS:
        torch.testing.assert_close(fused[threads], fused[1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fused[threads], reference, rtol=1e-4, atol=1e-4)
