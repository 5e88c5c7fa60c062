"""The attention entry point: every path (eager, SDPA, native, cascade) follows the same rules.

The reference is a naive attention over explicitly repeated keys with the visibility rule written
out (causal, padding, sliding window), the layer's scale and soft-capping.
"""

from __future__ import annotations

import pytest
import torch

from kvlens.cache.entry import KeySet
from kvlens.components.attend import attend
from kvlens.components.attention_context import build_attention_context
from kvlens.components.attention_rules import AttentionSpec, visible
from kvlens.hooks import HookPoint

D = 8


def naive(q, k, v, allowed, scale, cap=None):
    """q [b, h, n, d]; k, v [b, kv, L, d]; allowed [b|1, 1, n, L]."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(-1, -2)) * scale
    if cap is not None:
        scores = cap * torch.tanh(scores / cap)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.nan_to_num(scores.softmax(-1)) @ v


def allowed_by_hand(n_new, total, real, window):
    """The visibility rule as loops: [b, 1, n_new, total]."""
    batch = real.shape[0]
    out = torch.zeros(batch, 1, n_new, total, dtype=torch.bool)
    for b in range(batch):
        for t in range(n_new):
            i = total - n_new + t
            for j in range(total):
                ok = j <= i and (bool(real[b, j]) or j == i)
                if window is not None:
                    ok = ok and i - j < window
                out[b, 0, t, j] = ok
    return out


def hooks(observed: bool) -> tuple[HookPoint, HookPoint]:
    scores, pattern = HookPoint(), HookPoint()
    if observed:
        pattern.add_hook(lambda x, hook: x)
    return scores, pattern


CASES = {  # n_new, cached, padded rows
    "prefill": (7, 0, False),
    "decode": (1, 9, False),
    "decode_padded": (1, 9, True),
    "chunk": (3, 7, False),
    "chunk_padded": (3, 7, True),
}


@pytest.mark.parametrize("window", [None, 1, 3, 6, 50])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("eager", [False, True], ids=["fast", "eager"])
def test_every_path_follows_the_rules(case, heads, window, eager) -> None:
    n_new, cached, padded = CASES[case]
    n_heads, n_kv = heads
    total = n_new + cached
    gen = torch.Generator().manual_seed(len(case) + n_kv)
    real = torch.ones(2, total, dtype=torch.long)
    if padded:
        real[1, :3] = 0
        real[0, total - n_new - 1] = 0
    q = torch.randn(2, n_heads, n_new, D, generator=gen)
    storage_k = torch.randn(2, n_kv, total + 4, D, generator=gen)
    storage_v = torch.randn(2, n_kv, total + 4, D, generator=gen)
    k, v = storage_k[:, :, :total], storage_v[:, :, :total]
    spec = AttentionSpec(n_heads, n_kv, D, scale=0.3, window=window)
    mask = real if padded or cached else None
    ctx = build_attention_context(n_new, total, mask, padded, torch.device("cpu"))
    got = attend(q, KeySet(k, v), spec, ctx, *hooks(eager))
    expected = naive(q, k, v, allowed_by_hand(n_new, total, real, window), 0.3)
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("window", [None, 4])
def test_soft_capping_bends_the_scores_as_the_rule_says(window) -> None:
    gen = torch.Generator().manual_seed(5)
    q = 3 * torch.randn(1, 4, 5, D, generator=gen)
    k, v = torch.randn(1, 2, 5, D, generator=gen), torch.randn(1, 2, 5, D, generator=gen)
    spec = AttentionSpec(4, 2, D, scale=D**-0.5, softcap=0.5, window=window)
    ctx = build_attention_context(5, 5, None, False, torch.device("cpu"))
    seen = []
    scores_hook, pattern_hook = HookPoint(), HookPoint()
    scores_hook.add_hook(lambda x, hook: seen.append(x))
    got = attend(q, KeySet(k, v), spec, ctx, scores_hook, pattern_hook)
    allowed = allowed_by_hand(5, 5, torch.ones(1, 5), window)
    assert torch.allclose(got, naive(q, k, v, allowed, D**-0.5, cap=0.5), atol=1e-5)
    assert not torch.allclose(got, naive(q, k, v, allowed, D**-0.5), atol=1e-3)
    finite = seen[0][torch.isfinite(seen[0])]
    assert finite.abs().max() <= 0.5
    # Soft-capping takes the eager path even with no hook: same numbers.
    plain = attend(q, KeySet(k, v), spec, ctx, HookPoint(), HookPoint())
    assert torch.allclose(plain, got, atol=1e-6)


@pytest.mark.parametrize("window", [None, 2, 5, 9])
@pytest.mark.parametrize("n_new", [1, 3])
@pytest.mark.parametrize("eager", [False, True], ids=["cascade", "eager"])
@pytest.mark.parametrize("prefix_padded", [False, True])
def test_shared_prefix_equals_the_prefix_copied_into_every_row(
    window, n_new, eager, prefix_padded
) -> None:
    gen = torch.Generator().manual_seed(11)
    prefix_len, own = 6, 2 + n_new
    pk, pv = (
        torch.randn(1, 2, prefix_len, D, generator=gen),
        torch.randn(1, 2, prefix_len, D, generator=gen),
    )
    k, v = torch.randn(3, 2, own, D, generator=gen), torch.randn(3, 2, own, D, generator=gen)
    q = torch.randn(3, 4, n_new, D, generator=gen)
    prefix_real = torch.ones(prefix_len, dtype=torch.bool)
    if prefix_padded:
        prefix_real[:2] = False
    spec = AttentionSpec(4, 2, D, scale=D**-0.5, window=window)
    ctx = build_attention_context(
        n_new, own, None, False, torch.device("cpu"),
        prefix_real=prefix_real if prefix_padded else None, prefix_len=prefix_len,
    )  # fmt: skip
    got = attend(q, KeySet(k, v, pk, pv), spec, ctx, *hooks(eager))
    whole_k = torch.cat((pk.expand(3, -1, -1, -1), k), dim=2)
    whole_v = torch.cat((pv.expand(3, -1, -1, -1), v), dim=2)
    real = torch.cat((prefix_real.long().expand(3, -1), torch.ones(3, own, dtype=torch.long)), 1)
    allowed = allowed_by_hand(n_new, prefix_len + own, real, window)
    assert torch.allclose(got, naive(q, whole_k, whole_v, allowed, D**-0.5), atol=1e-5)


def test_visible_matches_the_rule_written_out() -> None:
    real = torch.tensor([[1, 1, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0, 1]])
    for window in (None, 1, 2, 4):
        got = visible(3, 7, 0, real.bool(), window, "cpu")
        assert torch.equal(got, allowed_by_hand(3, 7, real, window))
        tail = visible(3, 4, 3, real[:, 3:].bool(), window, "cpu")
        assert torch.equal(tail, allowed_by_hand(3, 7, real, window)[..., 3:])


def test_spec_reads_the_config() -> None:
    from kvlens import ModelConfig

    cfg = ModelConfig(
        n_layers=3, d_model=16, n_heads=2, d_head=8, n_ctx=32, d_vocab=11,
        attn_scale=4.0, attn_scores_soft_cap=20.0, window_size=5,
        attn_types=("local", "global", "local"),
    )  # fmt: skip
    specs = [AttentionSpec.from_config(cfg, i) for i in range(3)]
    assert [s.window for s in specs] == [5, None, 5]
    assert specs[0].scale == 0.25 and specs[0].softcap == 20.0
    plain = AttentionSpec.from_config(cfg.replace(attn_scale=None, attn_scores_soft_cap=-1), 1)
    assert plain.scale == 8**-0.5 and plain.softcap is None
    with pytest.raises(ValueError, match="attn_types"):
        cfg.replace(attn_types=("local",))
    with pytest.raises(ValueError, match="window_size"):
        cfg.replace(window_size=None)
    with pytest.raises(ValueError, match="attn_scores_soft_cap"):
        cfg.replace(attn_scores_soft_cap=0.0)
