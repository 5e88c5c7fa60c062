"""Tests for ``kvlens.config``: the frozen, validated model configuration."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import kvlens
from kvlens import HookedTransformerConfig, ModelConfig

BASE = dict(n_layers=2, d_model=16, n_heads=4, d_head=4, n_ctx=32, d_vocab=50)


def make(**changes: object) -> ModelConfig:
    return ModelConfig(**{**BASE, **changes})  # type: ignore[arg-type]


def test_aliases():
    assert HookedTransformerConfig is ModelConfig
    assert kvlens.HookedTransformerConfig is ModelConfig
    assert kvlens.ModelConfig is ModelConfig


def test_frozen():
    cfg = make()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.n_layers = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.dtype = torch.float16  # type: ignore[misc]


def test_hashable_and_equal_by_value():
    assert make() == make()
    assert hash(make()) == hash(make())
    assert make() != make(n_layers=3)


def test_defaults_and_derived_values():
    cfg = make()
    assert cfg.dtype == torch.float32
    assert cfg.n_devices == 1
    assert cfg.n_key_value_heads is None
    assert cfg.n_kv_heads == 4
    assert cfg.d_mlp_resolved == 64
    assert cfg.rotary_dim_resolved == 4
    assert cfg.kv_bytes_per_token == 2 * 2 * 4 * 4 * 4


def test_derived_values_when_set():
    cfg = make(n_key_value_heads=2, d_mlp=24, rotary_dim=2, dtype=torch.bfloat16)
    assert cfg.n_kv_heads == 2
    assert cfg.d_mlp_resolved == 24
    assert cfg.rotary_dim_resolved == 2
    assert cfg.kv_bytes_per_token == 2 * 2 * 2 * 4 * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_float_dtypes_accepted(dtype):
    assert make(dtype=dtype).dtype == dtype


BAD_FIELDS = [
    ("n_layers", 0),
    ("n_layers", -1),
    ("n_layers", 1.5),
    ("n_layers", True),
    ("n_layers", "2"),
    ("d_model", 0),
    ("n_heads", 0),
    ("d_head", 0),
    ("n_ctx", 0),
    ("d_vocab", 0),
    ("n_devices", 0),
    ("d_mlp", 0),
    ("d_mlp", True),
    ("d_mlp", 2.0),
    ("n_key_value_heads", 0),
    ("n_key_value_heads", 3),  # does not divide n_heads=4
    ("n_key_value_heads", 8),
    ("n_key_value_heads", True),
    ("act_fn", "tanh"),
    ("normalization_type", "BN"),
    ("normalization_type", None),
    ("positional_embedding_type", "alibi"),
    ("rotary_dim", 3),
    ("rotary_dim", 0),
    ("rotary_dim", 6),  # > d_head=4
    ("rotary_dim", True),
    ("eps", 0.0),
    ("eps", -1e-5),
    ("eps", float("nan")),
    ("eps", "1e-5"),
    ("rotary_base", 0),
    ("rotary_base", None),
    ("dtype", torch.int32),
    ("dtype", torch.bool),
    ("dtype", "float32"),
]


@pytest.mark.parametrize(("field", "value"), BAD_FIELDS, ids=[f"{f}={v!r}" for f, v in BAD_FIELDS])
def test_bad_field_raises_value_error_naming_it(field, value):
    with pytest.raises(ValueError) as info:
        make(**{field: value})
    message = str(info.value)
    assert f"ModelConfig.{field}" in message
    assert repr(value) in message


def test_replace_validates_again():
    cfg = make()
    assert cfg.replace(n_layers=5).n_layers == 5
    assert cfg.n_layers == 2
    with pytest.raises(ValueError, match="n_layers"):
        cfg.replace(n_layers=0)
    with pytest.raises(ValueError, match="n_key_value_heads"):
        dataclasses.replace(cfg, n_key_value_heads=3)


def test_dict_round_trip_through_json():
    cfg = make(n_key_value_heads=2, dtype=torch.bfloat16, device="cpu", model_name="tiny")
    data = cfg.to_dict()
    assert data["dtype"] == "bfloat16"
    assert ModelConfig.from_dict(json.loads(json.dumps(data))) == cfg


def test_from_dict_rejects_unknown_fields_and_dtypes():
    with pytest.raises(ValueError, match="not_a_field"):
        ModelConfig.from_dict({**BASE, "not_a_field": 1})
    with pytest.raises(ValueError, match=r"ModelConfig\.dtype"):
        ModelConfig.from_dict({**BASE, "dtype": "floaty"})


def test_fingerprint_covers_layout_not_placement():
    cfg = make()
    assert cfg.fingerprint() == make().fingerprint()
    assert len(cfg.fingerprint()) == 16
    assert cfg.fingerprint() == make(device="cpu", n_devices=2).fingerprint()
    assert cfg.fingerprint() == make(default_prepend_bos=False).fingerprint()
    for changes in ({"d_head": 8}, {"n_key_value_heads": 2}, {"dtype": torch.float16}):
        assert make(**changes).fingerprint() != cfg.fingerprint()
