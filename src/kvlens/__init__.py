"""kvlens: hooked causal transformers with a fast, first-class key-value cache.

Shape vocabulary used in annotations throughout the package:

- ``batch``: rows of a batch.
- ``pos``: positions of the tokens in this forward pass.
- ``kv_pos``: positions attended to (cached plus new).
- ``head_index``: query heads; ``kv_head``: key/value heads (fewer under grouped-query attention).
- ``d_model``, ``d_head``, ``d_mlp``, ``d_vocab``: widths of the residual stream, one head, the MLP
  hidden layer and the vocabulary.
"""

from kvlens.cache import (
    HookedTransformerKeyValueCache,
    HookedTransformerKeyValueCacheEntry,
    KeyValueCache,
    KeyValueCacheEntry,
    SharedPrefixCache,
)
from kvlens.config import HookedTransformerConfig, ModelConfig
from kvlens.devices import get_device_for_block_index
from kvlens.factored_matrix import FactoredMatrix
from kvlens.hooks import ActivationCache, HookPoint, get_act_name
from kvlens.model import HookedTransformer

__version__ = "0.1.0"

__all__ = [
    "ActivationCache",
    "FactoredMatrix",
    "HookPoint",
    "HookedTransformer",
    "HookedTransformerConfig",
    "HookedTransformerKeyValueCache",
    "HookedTransformerKeyValueCacheEntry",
    "KeyValueCache",
    "KeyValueCacheEntry",
    "ModelConfig",
    "SharedPrefixCache",
    "get_act_name",
    "get_device_for_block_index",
]
