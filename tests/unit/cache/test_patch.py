"""Key/value patching between caches of one model: exact where chosen, refused when wrong."""

from __future__ import annotations

import pytest
import torch

from kvlens import HookedTransformer, KeyValueCache, ModelConfig


def tiny(seed: int = 0) -> HookedTransformer:
    cfg = ModelConfig(
        n_layers=2, d_model=32, n_heads=4, d_head=8, n_key_value_heads=2, d_mlp=48, n_ctx=64,
        d_vocab=50, act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
        gated_mlp=True, attn_qkv_bias=False, attn_out_bias=False, mlp_bias=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    return HookedTransformer(cfg).eval()


MODEL = tiny()
GEN = torch.Generator().manual_seed(0)
CLEAN = torch.randint(0, 50, (2, 6), generator=GEN)
CORRUPT = torch.randint(0, 50, (2, 6), generator=GEN)
NEXT = torch.randint(0, 50, (2, 1), generator=GEN)


def filled(tokens: torch.Tensor) -> KeyValueCache:
    with torch.no_grad():
        return MODEL.prefill(tokens)


def next_logits(cache: KeyValueCache) -> torch.Tensor:
    with torch.no_grad():
        return MODEL(NEXT, past_kv_cache=cache)[:, -1]


def test_patching_everything_gives_the_corrupted_run_and_nothing_changes_nothing() -> None:
    corrupt = filled(CORRUPT)
    expected = next_logits(corrupt.clone())
    patched = filled(CLEAN).patch_from(corrupt)
    assert torch.allclose(next_logits(patched), expected, atol=1e-5)
    clean = next_logits(filled(CLEAN))
    untouched = filled(CLEAN).patch_from(corrupt, layers=[])
    assert torch.equal(next_logits(untouched), clean)
    assert not torch.allclose(clean, expected, atol=1e-3)


def test_only_the_chosen_layer_heads_positions_and_parts_change() -> None:
    clean, corrupt = filled(CLEAN), filled(CORRUPT)
    before = [(e.past_keys.clone(), e.past_values.clone()) for e in clean]
    clean.patch_from(corrupt, layers=[-1], heads=[0], positions=[2, 4], values=False)
    for i, (entry, (keys, values)) in enumerate(zip(clean, before, strict=True)):
        assert torch.equal(entry.past_values, values)  # values untouched
        want = keys.clone()
        if i == 1:
            want[:, [2, 4], 0] = corrupt[1].past_keys[:, [2, 4], 0]
        assert torch.equal(entry.past_keys, want)


def test_a_batch_1_source_is_copied_into_every_row() -> None:
    clean, corrupt = filled(CLEAN), filled(CORRUPT[:1])
    clean.patch_from(corrupt, positions=[0, 1])
    for entry, source in zip(clean, corrupt, strict=True):
        assert torch.equal(entry.past_keys[:, :2], source.past_keys[:, :2].expand(2, -1, -1, -1))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(layers=[2]), IndexError, "layer 2 is out of range"),
        (dict(heads=[2]), IndexError, "key/value head 2 is out of range"),
        (dict(positions=[6]), IndexError, "position 6 is out of range"),
        (dict(positions=[0.5]), TypeError, "ints"),
        (dict(keys=False, values=False), ValueError, "keys=True or values=True"),
    ],
)
def test_bad_selections_are_refused_before_anything_is_written(kwargs, error, match) -> None:
    clean, corrupt = filled(CLEAN), filled(CORRUPT)
    before = [e.past_keys.clone() for e in clean]
    with pytest.raises(error, match=match):
        clean.patch_from(corrupt, **kwargs)
    assert all(torch.equal(e.past_keys, k) for e, k in zip(clean, before, strict=True))


def test_another_models_or_a_shorter_cache_is_refused() -> None:
    clean = filled(CLEAN)
    with torch.no_grad():
        other = tiny(seed=1).prefill(CORRUPT)
    with pytest.raises(ValueError, match="another model"):
        clean.patch_from(other)
    with pytest.raises(IndexError, match="not held by source"):
        clean.patch_from(filled(CORRUPT[:, :4]))
    with pytest.raises(ValueError, match="batch size"):
        clean.patch_from(filled(torch.cat([CORRUPT, CORRUPT])))
    assert torch.equal(next_logits(clean), next_logits(filled(CLEAN)))
