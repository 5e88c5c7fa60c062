"""Placement of blocks (and their cache entries) across devices."""

from __future__ import annotations

import torch

from kvlens.config import ModelConfig


def get_device_for_block_index(
    index: int, cfg: ModelConfig, device: torch.device | str | None = None
) -> torch.device:
    """The device that block ``index`` (and its cache entry) lives on.

    Blocks are split into ``cfg.n_devices`` contiguous groups with ``(index * n_devices) //
    n_layers``, which names a valid device whether or not ``n_layers`` is a multiple of
    ``n_devices`` (TransformerLens's older ``index // (n_layers // n_devices)`` does not).

    Args:
        index: Block index in ``[0, cfg.n_layers)``.
        cfg: The model's config.
        device: The first device. ``None`` means ``cfg.device``, then torch's default device.

    Returns:
        ``device`` itself when it is the CPU or ``n_devices`` is 1; otherwise the device of the same
        type with index ``first index + group``.
    """
    if not 0 <= index < cfg.n_layers:
        raise ValueError(f"index must be in [0, n_layers={cfg.n_layers}), got {index}")
    if device is None:
        device = cfg.device if cfg.device is not None else torch.get_default_device()
    device = torch.device(device)
    if device.type == "cpu" or cfg.n_devices == 1:
        return device
    first = device.index if device.index is not None else 0
    return torch.device(device.type, first + (index * cfg.n_devices) // cfg.n_layers)
