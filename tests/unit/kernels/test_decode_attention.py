"""The native one-query attention against a float64 softmax attention."""

from __future__ import annotations

import pytest
import torch

from kvlens import kernels
from kvlens.kernels import build


def native(q, k, v, mask=None, threads=None):  # type: ignore[no-untyped-def]
    """The kernel with the default rule's scale, ``1 / sqrt(d_head)``."""
    return kernels.decode_attention(q, k, v, mask, threads, scale=q.shape[-1] ** -0.5)


def native_lse(q, k, v, mask=None, threads=None):  # type: ignore[no-untyped-def]
    return kernels.decode_attention_lse(q, k, v, mask, threads, scale=q.shape[-1] ** -0.5)


pytestmark = pytest.mark.skipif(not build.available(), reason="native kernels not built here")


def reference(q, k, v, mask):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1).double(), v.repeat_interleave(group, 1).double()
    scores = (q.double() @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (torch.softmax(scores, -1).nan_to_num(0.0) @ v).float()


@pytest.mark.parametrize(
    ("batch", "n_heads", "n_kv", "kv_len", "d_head"),
    [
        (1, 9, 3, 1, 64),  # one key
        (1, 9, 3, 129, 64),  # SmolLM2's heads; a partial block of 16 keys
        (2, 8, 2, 700, 64),  # several chunks of 256 keys, merged
        (1, 12, 12, 600, 64),  # multi-head (GPT-2)
        (3, 6, 2, 33, 20),  # d_head not a multiple of 16: the scalar path
        (1, 8, 1, 300, 128),  # multi-query, wide heads
    ],
)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_equals_softmax_attention(
    batch: int, n_heads: int, n_kv: int, kv_len: int, d_head: int, masked: bool, threads: int
) -> None:
    gen = torch.Generator().manual_seed(batch * 1000 + kv_len)
    # Queries as the model makes them ([batch, 1, head, d] transposed); keys and values as views
    # of a larger cache storage [batch, kv_head, capacity, d].
    q = 3 * torch.randn(batch, 1, n_heads, d_head, generator=gen).transpose(1, 2)
    k = torch.randn(batch, n_kv, kv_len + 5, d_head, generator=gen)[:, :, :kv_len]
    v = torch.randn(batch, n_kv, kv_len + 5, d_head, generator=gen)[:, :, :kv_len]
    mask = None
    if masked:
        mask = torch.rand(batch, 1, 1, kv_len, generator=gen) > 0.4
        mask[..., -1] = True
    got = native(q, k, v, mask, threads=threads)
    assert got is not None and got.shape == (batch, n_heads, 1, d_head)
    torch.testing.assert_close(got, reference(q, k, v, mask), rtol=1e-5, atol=2e-6)


def test_extreme_scores_stay_finite() -> None:
    # Scores far apart (exp underflows for all but one key) and scores all equal.
    q = torch.zeros(1, 2, 1, 16)
    q[..., 0] = 400.0
    k = torch.randn(1, 1, 50, 16)
    v = torch.randn(1, 1, 50, 16)
    got = native(q, k, v)
    assert got is not None and bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, reference(q, k, v, None), rtol=1e-5, atol=1e-5)
    flat = native(torch.zeros(1, 2, 1, 16), k, v)
    assert flat is not None
    torch.testing.assert_close(flat[0, 0, 0], v[0, 0].mean(0), rtol=1e-5, atol=1e-6)


def test_a_row_with_no_allowed_key_gets_zeros() -> None:
    q, k = torch.randn(2, 2, 1, 16), torch.randn(2, 1, 5, 16)
    mask = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    mask[1] = False
    got = native(q, k, k.clone(), mask)
    assert got is not None and torch.equal(got[1], torch.zeros(2, 1, 16))
    torch.testing.assert_close(got[0], reference(q, k, k, mask)[0])


def test_declines_what_it_does_not_do() -> None:
    q, k = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 5, 8)
    assert native(q, k, k) is not None
    assert native(torch.randn(1, 4, 2, 8), k, k) is None  # two queries
    assert native(torch.randn(1, 3, 1, 8), k, k) is None  # 3 heads over 2
    assert native(torch.randn(1, 18, 1, 8), torch.randn(1, 2, 5, 8), k) is None
    assert native(q.double(), k.double(), k.double()) is None
    assert native(q, k, k, torch.ones(1, 1, 1, 5)) is None  # float mask
    assert native(q, k, k, torch.ones(1, 1, 2, 5, dtype=torch.bool)) is None
    assert native(q, k, k.transpose(2, 3).contiguous().mT) is None  # strides
    assert native(q, k[:, :, :0], k[:, :, :0]) is None  # no keys


@pytest.mark.parametrize("masked", [False, True])
def test_log_sum_exp_of_the_scaled_scores(masked: bool) -> None:
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, 6, 1, 16, generator=gen)
    k, v = torch.randn(2, 2, 300, 16, generator=gen), torch.randn(2, 2, 300, 16, generator=gen)
    mask = None
    if masked:
        mask = torch.rand(2, 1, 1, 300, generator=gen) > 0.5
        mask[1] = False  # a row with no allowed key: lse -inf, output zeros
    result = native_lse(q, k, v, mask)
    assert result is not None
    out, lse = result
    assert lse.shape == (2, 6, 1)
    scores = (q.double() @ k.double().repeat_interleave(3, 1).transpose(-1, -2)) * 16**-0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, reference(q, k, v, mask), rtol=1e-5, atol=2e-6)
