"""HookedTransformer's forward: argument checks, return types, layer ranges, configs no HF family
in the parity tests covers."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from kvlens import HookedTransformer, KeyValueCache, ModelConfig
from kvlens.model import Output

CFG = ModelConfig(
    n_layers=2,
    d_model=16,
    n_heads=4,
    d_head=4,
    n_ctx=12,
    d_vocab=23,
    d_mlp=32,
    positional_embedding_type="rotary",
    rotary_dim=2,
    rotary_adjacent_pairs=True,
    n_key_value_heads=1,
    normalization_type="RMS",
    act_fn="relu",
    unembed_bias=True,
    final_norm=False,
)


def make_model(cfg: ModelConfig = CFG) -> HookedTransformer:
    torch.manual_seed(0)
    model = HookedTransformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model


@pytest.fixture(scope="module")
def model() -> HookedTransformer:
    return make_model()


@pytest.mark.parametrize(
    "cfg",
    [
        CFG,
        CFG.replace(
            positional_embedding_type="standard",
            normalization_type="LN",
            parallel_attn_mlp=True,
            gated_mlp=True,
            act_fn="gelu",
        ),
    ],
    ids=["gptj_rotary_mqa", "learned_parallel_gated"],
)
@torch.no_grad()
def test_cached_equals_uncached_for_other_configs(cfg: ModelConfig) -> None:
    model = make_model(cfg)
    tokens = torch.randint(0, 23, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1] * 9, [0, 0, 1, 1, 1, 1, 1, 0, 1]])
    expected = model(tokens, attention_mask=mask)
    cache = KeyValueCache.init_cache(cfg, None, batch_size=2)
    pieces = [model(tokens[:, :5], attention_mask=mask[:, :5], past_kv_cache=cache)]
    for i in range(5, 9):
        pieces.append(
            model(tokens[:, i : i + 1], attention_mask=mask[:, i : i + 1], past_kv_cache=cache)
        )
    got = torch.cat(pieces, dim=1)
    assert torch.allclose(got[mask.bool()], expected[mask.bool()], atol=1e-5)


@torch.no_grad()
def test_return_types(model: HookedTransformer) -> None:
    tokens = torch.tensor([[1, 2, 3, 4]])
    logits = model(tokens)
    assert logits.shape == (1, 4, 23)
    assert torch.equal(model(tokens[0]), logits)  # 1-D tokens are one row
    assert model(tokens, return_type=None) is None
    loss = model(tokens, "loss")
    assert loss.ndim == 0 and loss > 0
    both = model(tokens, return_type="both")
    assert isinstance(both, Output) and torch.equal(both.logits, logits)
    assert torch.equal(both.loss, loss)
    assert model(tokens, "loss", loss_per_token=True).shape == (1, 3)


@torch.no_grad()
def test_stop_and_start_at_layer(model: HookedTransformer) -> None:
    tokens = torch.tensor([[5, 6, 7, 8, 9]])
    logits, acts = model.run_with_cache(tokens)
    resid = model(tokens, stop_at_layer=1)
    assert torch.allclose(resid, acts["blocks.1.hook_resid_pre"], atol=1e-6)
    assert torch.allclose(model(resid, start_at_layer=1), logits, atol=1e-6)
    assert torch.allclose(model(resid, start_at_layer=-1), logits, atol=1e-6)
    loss = model(resid, "loss", start_at_layer=1, tokens=tokens)
    assert torch.allclose(loss, model(tokens, "loss"), atol=1e-6)
    with pytest.raises(ValueError, match="tokens="):
        model(resid, "loss", start_at_layer=1)


@torch.no_grad()
def test_invalid_arguments_are_named(model: HookedTransformer) -> None:
    tokens = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"token ids in \[1, 23\].*d_vocab=23"):
        model(torch.tensor([[1, 23]]))
    with pytest.raises(ValueError, match=r"\[batch, pos\]"):
        model(torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="start_at_layer"):
        model(torch.randn(1, 3))
    with pytest.raises(
        ValueError, match=r"token embeddings input must be \[batch, pos, d_model=16\]"
    ):
        model(torch.randn(1, 3, 8))
    assert torch.equal(model(model.embed(tokens)), model(tokens))  # embeddings for tokens
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(tokens, attention_mask=torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="attention_mask"):
        model(tokens, attention_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="return_type"):
        model(tokens, return_type="logit")
    with pytest.raises(ValueError, match="past_kv_cache has batch size 2"):
        model(tokens, past_kv_cache=KeyValueCache.init_cache(CFG, None, batch_size=2))
    with pytest.raises(ValueError, match="d_model=16"):
        model(torch.randn(1, 3, 8), start_at_layer=1)


@torch.no_grad()
def test_positions_past_n_ctx(model: HookedTransformer) -> None:
    with pytest.raises(ValueError, match="n_ctx=12"):
        model(torch.zeros(1, 13, dtype=torch.long))
    cache = KeyValueCache.init_cache(CFG, None)
    model(torch.zeros(1, 10, dtype=torch.long), past_kv_cache=cache)
    with pytest.raises(ValueError, match="cache 10 \\+ 3 new"):
        model(torch.zeros(1, 3, dtype=torch.long), past_kv_cache=cache)
    # Padding consumes no position: 14 tokens of which 12 are real fit.
    mask = torch.tensor([[0, 0] + [1] * 12])
    assert model(torch.zeros(1, 14, dtype=torch.long), attention_mask=mask).shape == (1, 14, 23)


def test_uneven_cache_is_refused(model: HookedTransformer) -> None:
    cache = KeyValueCache.init_cache(CFG, None)
    with torch.no_grad():
        resid = torch.randn(1, 2, 16)
        model(resid, past_kv_cache=cache, start_at_layer=1)  # only layer 1 advances
        with pytest.raises(ValueError, match="extended unevenly"):
            model(torch.tensor([[1, 2]]), past_kv_cache=cache)


def test_transformer_lens_weight_shortcuts(model: HookedTransformer) -> None:
    assert model.W_Q.shape == model.W_K.shape == model.W_V.shape == (2, 4, 16, 4)
    assert model.blocks[0].attn._W_K.shape == (1, 16, 4)  # the one stored kv head
    assert model.W_O.shape == (2, 4, 4, 16) and model.W_in.shape == (2, 16, 32)
    assert model.W_E.shape == (23, 16) and model.W_U.shape == (16, 23)
    assert model.b_U is model.unembed.b_U and model.b_U.shape == (23,)
    assert model.W_gate is None  # a plain MLP has no gate
    assert model.b_K.shape == (2, 4, 4) and model.b_O.shape == (2, 16)
    assert model.QK.shape == model.OV.shape == (2, 4, 16, 16)
    assert model.all_head_labels()[:5] == ["L0H0", "L0H1", "L0H2", "L0H3", "L1H0"]
    with pytest.raises(AttributeError):
        model.W_E_pos  # noqa: B018 (rotary: no learned positions, as in TransformerLens)
    assert "blocks.0.attn.hook_rot_k" in model.hook_dict and "hook_pos_embed" not in model.hook_dict
    assert "ln_final.hook_normalized" not in model.hook_dict  # final_norm=False


def test_missing_biases_are_zeros() -> None:
    """Biases the config leaves out are TransformerLens's zeros, of its shapes."""
    model = make_model(
        CFG.replace(attn_qkv_bias=False, attn_out_bias=False, mlp_bias=False, unembed_bias=False)
    )
    for name, shape in (
        ("b_Q", (2, 4, 4)), ("b_K", (2, 4, 4)), ("b_V", (2, 4, 4)), ("b_O", (2, 16)),
        ("b_in", (2, 32)), ("b_out", (2, 16)), ("b_U", (23,)),
    ):  # fmt: skip
        assert torch.equal(getattr(model, name), torch.zeros(shape)), name
    assert torch.equal(model.accumulated_bias(2, include_mlp_biases=True), torch.zeros(16))


def test_state_dict_names() -> None:
    names = set(HookedTransformer(CFG.replace(gated_mlp=True, n_layers=1)).state_dict())
    assert names == {
        "embed.W_E",
        "blocks.0.ln1.w",
        "blocks.0.ln2.w",
        "blocks.0.attn.W_QKV",
        "blocks.0.attn.b_QKV",
        "blocks.0.attn.W_O_flat",
        "blocks.0.attn.b_O",
        "blocks.0.mlp.W_gate_in",
        "blocks.0.mlp.b_gate_in",
        "blocks.0.mlp.W_out",
        "blocks.0.mlp.b_out",
        "unembed.W_U",
        "unembed.b_U",
    }


def test_import_kvlens_does_not_import_transformers() -> None:
    code = "import sys, kvlens; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
