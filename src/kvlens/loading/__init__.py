"""Converters from other formats into kvlens configs and state dicts."""

from kvlens.loading.hf import config_from_hf, convert_hf_state_dict

__all__ = ["config_from_hf", "convert_hf_state_dict"]
