"""The attention module against a per-head reference built from its TransformerLens-style views."""

from __future__ import annotations

import pytest
import torch

from kvlens.components.attention import Attention
from kvlens.components.attention_context import build_attention_context
from kvlens.config import ModelConfig

CFG = ModelConfig(
    n_layers=1, d_model=16, n_heads=4, d_head=4, n_ctx=16, d_vocab=10, n_key_value_heads=2
)


def make_attention(cfg: ModelConfig = CFG) -> Attention:
    attn = Attention(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return attn


def test_views_have_transformer_lens_shapes_and_share_storage() -> None:
    attn = make_attention()
    assert attn.W_Q.shape == attn.W_K.shape == attn.W_V.shape == (4, 16, 4)
    assert attn._W_K.shape == attn._W_V.shape == (2, 16, 4)
    assert attn.W_O.shape == (4, 4, 16)
    assert attn.b_Q.shape == attn.b_K.shape == attn.b_V.shape == (4, 4)
    assert attn._b_K.shape == attn._b_V.shape == (2, 4)
    # Grouped: each kv head serves two query heads.
    assert torch.equal(attn.W_K, attn._W_K.repeat_interleave(2, dim=0))
    assert torch.equal(attn.b_V[2:], attn._b_V[1:].expand(2, 4))
    with torch.no_grad():
        attn._W_K[1].fill_(7.0)
        attn.W_Q[3].fill_(5.0)
        attn._b_V[0].fill_(3.0)
    assert torch.equal(attn.W_QKV[:, 16 + 4 : 16 + 8], torch.full((16, 4), 7.0))
    assert torch.equal(attn.W_QKV[:, 12:16], torch.full((16, 4), 5.0))
    assert attn.b_QKV is not None and torch.equal(attn.b_QKV[24:28], torch.full((4,), 3.0))
    assert torch.equal(attn.W_K[2:], torch.full((2, 16, 4), 7.0))


def test_repeated_grouped_weights_are_copies() -> None:
    attn = make_attention()
    before = attn.W_QKV.detach().clone()
    with torch.no_grad():
        attn.W_K.fill_(1.0)
        attn.b_V.fill_(1.0)
    assert torch.equal(attn.W_QKV, before)


def test_without_grouping_key_weights_are_views() -> None:
    attn = make_attention(CFG.replace(n_key_value_heads=None))
    assert attn.W_K.shape == (4, 16, 4)
    with torch.no_grad():
        attn.W_K[1].fill_(7.0)
        attn.b_V[2].fill_(2.0)
    assert torch.equal(attn.W_QKV[:, 16 + 4 : 16 + 8], torch.full((16, 4), 7.0))
    assert attn.b_QKV is not None and torch.equal(attn.b_QKV[40:44], torch.full((4,), 2.0))


def test_missing_biases_are_zeros() -> None:
    attn = make_attention(CFG.replace(attn_qkv_bias=False, attn_out_bias=False))
    assert attn.b_QKV is None and attn.b_O is None  # the storage stays absent
    for bias, heads in ((attn.b_Q, 4), (attn.b_K, 4), (attn.b_V, 4), (attn._b_K, 2)):
        assert torch.equal(bias, torch.zeros(heads, 4))


def test_circuits_are_factored_products() -> None:
    attn = make_attention()
    qk, ov = attn.QK, attn.OV
    assert qk.shape == ov.shape == (4, 16, 16) and qk.mdim == ov.mdim == 4
    torch.testing.assert_close(qk.AB, attn.W_Q @ attn.W_K.transpose(-2, -1))
    torch.testing.assert_close(ov.AB, attn.W_V @ attn.W_O)


@pytest.mark.parametrize("hooked", [False, True], ids=["fused", "eager"])
def test_matches_per_head_reference(hooked: bool) -> None:
    attn = make_attention()
    if hooked:
        attn.hook_pattern.add_hook(lambda t, *, hook: None)
    x = torch.randn(2, 5, 16)
    ctx = build_attention_context(5, 5, None, False, torch.device("cpu"))
    q = torch.einsum("bpd,hde->bphe", x, attn.W_Q) + attn.b_Q
    k = torch.einsum("bpd,hde->bphe", x, attn.W_K) + attn.b_K
    v = torch.einsum("bpd,hde->bphe", x, attn.W_V) + attn.b_V
    scores = torch.einsum("bqhe,bkhe->bhqk", q, k) / 2.0
    scores = scores.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
    z = torch.einsum("bhqk,bkhe->bqhe", scores.softmax(-1), v)
    expected = torch.einsum("bqhe,hed->bqd", z, attn.W_O) + attn.b_O
    assert torch.allclose(attn(x, ctx), expected, atol=1e-5)


def test_rotary_layer_needs_rotary_angles() -> None:
    attn = make_attention(CFG.replace(positional_embedding_type="rotary"))
    ctx = build_attention_context(1, 1, None, False, torch.device("cpu"))
    with pytest.raises(ValueError, match="rotary"):
        attn(torch.randn(1, 1, 16), ctx)


def test_fast_path_reads_the_cache_storage_without_copying(monkeypatch) -> None:
    from kvlens.cache.entry import KeyValueCacheEntry
    from kvlens.components import attention_math

    attn = make_attention()
    entry = KeyValueCacheEntry.init_cache_entry(CFG, None, batch_size=1, capacity=16)
    seen = []
    real = attention_math.F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append((k.data_ptr(), v.data_ptr()))
        return real(q, k, v, **kwargs)

    real_native = attention_math.kernels.decode_attention

    def spy_native(q, k, v, mask=None, threads=None, **kwargs):
        seen.append((k.data_ptr(), v.data_ptr()))
        return real_native(q, k, v, mask, threads, **kwargs)

    # A decode step goes to the native kernel when it is built, else to torch: spy on both.
    monkeypatch.setattr(attention_math.F, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(attention_math.kernels, "decode_attention", spy_native)
    with torch.no_grad():
        attn(
            torch.randn(1, 3, 16),
            build_attention_context(3, 3, None, False, torch.device("cpu")),
            entry,
        )
        attn(
            torch.randn(1, 1, 16),
            build_attention_context(1, 4, None, False, torch.device("cpu")),
            entry,
        )
    assert seen == [(entry._keys.data_ptr(), entry._values.data_ptr())] * 2
    assert entry.length == 4
