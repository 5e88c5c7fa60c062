"""Key-value cache: storage (``entry``) and the whole-model cache (``cache``)."""

from kvlens.cache.cache import HookedTransformerKeyValueCache, KeyValueCache
from kvlens.cache.entry import HookedTransformerKeyValueCacheEntry, KeyValueCacheEntry
from kvlens.cache.shared import SharedPrefixCache

__all__ = [
    "HookedTransformerKeyValueCache",
    "HookedTransformerKeyValueCacheEntry",
    "KeyValueCache",
    "KeyValueCacheEntry",
    "SharedPrefixCache",
]
