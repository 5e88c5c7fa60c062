"""Tests for ``kvlens.devices``: which device each block lives on.

The function only builds ``torch.device`` objects, so CUDA device strings are tested without CUDA.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kvlens
from kvlens import ModelConfig, get_device_for_block_index


def make(n_layers: int = 10, n_devices: int = 1, **changes: object) -> ModelConfig:
    fields: dict[str, object] = dict(
        n_layers=n_layers, d_model=8, n_heads=2, d_head=4, n_ctx=8, d_vocab=8, n_devices=n_devices
    )
    fields.update(changes)
    return ModelConfig(**fields)  # type: ignore[arg-type]


def placement(cfg: ModelConfig, device: str | torch.device | None) -> list[torch.device]:
    return [get_device_for_block_index(i, cfg, device) for i in range(cfg.n_layers)]


def test_exported():
    assert kvlens.get_device_for_block_index is get_device_for_block_index


def test_three_devices_ten_layers():
    devices = placement(make(10, 3), "cuda")
    assert all(d.type == "cuda" for d in devices)
    indices = [d.index for d in devices]
    assert indices == [(i * 3) // 10 for i in range(10)]
    assert indices == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert all(0 <= i < 3 for i in indices)
    assert indices == sorted(indices)  # contiguous groups
    assert set(indices) == {0, 1, 2}


def test_first_device_index_offsets_every_group():
    devices = placement(make(10, 3), "cuda:2")
    assert [d.index for d in devices] == [2, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert placement(make(10, 3), torch.device("cuda", 2)) == devices


@given(n_layers=st.integers(1, 64), n_devices=st.integers(1, 16))
def test_groups_are_contiguous_balanced_and_in_range(n_layers, n_devices):
    indices = [d.index for d in placement(make(n_layers, n_devices), "cuda:0")]
    assert all(0 <= i < n_devices for i in indices)
    assert indices == sorted(indices)
    if n_devices == 1:
        return
    groups = [indices.count(d) for d in range(n_devices)]
    used = [g for g in groups if g]
    assert len(used) == min(n_devices, n_layers)
    assert max(used) - min(used) <= 1  # as even as the numbers allow


@pytest.mark.parametrize("n_devices", [1, 2, 4])
def test_cpu_stays_cpu(n_devices):
    assert all(d == torch.device("cpu") for d in placement(make(4, n_devices), "cpu"))


def test_single_device_returns_the_device_given():
    assert placement(make(4, 1), "cuda:1") == [torch.device("cuda:1")] * 4
    assert placement(make(4, 1), "cuda") == [torch.device("cuda")] * 4


def test_device_none_uses_cfg_device_then_torch_default():
    cfg = make(4, 2, device="cuda:1")
    assert [d.index for d in placement(cfg, None)] == [1, 1, 2, 2]
    assert placement(make(4, 1), None) == [torch.get_default_device()] * 4


@pytest.mark.parametrize("index", [-1, 10, 11])
def test_index_out_of_range(index):
    with pytest.raises(ValueError, match=rf"index.*10.*{index}"):
        get_device_for_block_index(index, make(10, 3), "cuda")
