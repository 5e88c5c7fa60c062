"""Property test: kvlens's cache behaves exactly like a cache that grows by ``torch.cat``.

The reference below restates TransformerLens 2.18's ``HookedTransformerKeyValueCache`` contract in
the plainest way: every append concatenates, and stores the result unless frozen. Any sequence of
forward-pass-like appends, freezes, unfreezes, mask appends, rejected appends and reserves must
give the same tensors in both.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from torch import Tensor

from kvlens import KeyValueCache, ModelConfig
from kvlens.cache.entry import MIN_CAPACITY

MAX_NEW_TOKENS = 5
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


class ReferenceEntry:
    """One layer: ``[batch, pos, kv_head, d_head]`` tensors replaced by concatenation."""

    def __init__(self, batch: int, heads: int, d_head: int, dtype: torch.dtype) -> None:
        self.past_keys = torch.empty((batch, 0, heads, d_head), dtype=dtype)
        self.past_values = torch.empty((batch, 0, heads, d_head), dtype=dtype)
        self.frozen = False

    def append(self, new_keys: Tensor, new_values: Tensor) -> tuple[Tensor, Tensor]:
        keys = torch.cat([self.past_keys, new_keys], dim=1)
        values = torch.cat([self.past_values, new_values], dim=1)
        if not self.frozen:
            self.past_keys, self.past_values = keys, values
        return keys, values


class ReferenceCache:
    def __init__(self, cfg: ModelConfig, batch: int) -> None:
        self.entries = [
            ReferenceEntry(batch, cfg.n_kv_heads, cfg.d_head, cfg.dtype)
            for _ in range(cfg.n_layers)
        ]
        self.previous_attention_mask = torch.empty((batch, 0), dtype=torch.int)
        self.frozen = False

    def freeze(self) -> None:
        self.frozen = True
        for entry in self.entries:
            entry.frozen = True

    def unfreeze(self) -> None:
        self.frozen = False
        for entry in self.entries:
            entry.frozen = False

    def append_attention_mask(self, mask: Tensor) -> Tensor:
        full = torch.cat([self.previous_attention_mask, mask], dim=-1)
        if not self.frozen:
            self.previous_attention_mask = full
        return full


def assert_same(actual: Tensor, expected: Tensor) -> None:
    assert actual.shape == expected.shape
    assert torch.equal(actual, expected)


class CacheMatchesReference(RuleBasedStateMachine):
    @initialize(
        batch=st.integers(1, 3),
        n_layers=st.integers(1, 3),
        kv_heads=st.integers(1, 3),
        group=st.integers(1, 2),
        d_head=st.integers(1, 4),
        dtype=st.sampled_from(DTYPES),
        capacity=st.integers(0, 8),
        seed=st.integers(0, 2**16),
    )
    def setup(self, batch, n_layers, kv_heads, group, d_head, dtype, capacity, seed):
        n_heads = kv_heads * group
        self.cfg = ModelConfig(
            n_layers=n_layers,
            d_model=n_heads * d_head,
            n_heads=n_heads,
            d_head=d_head,
            n_ctx=512,
            d_vocab=8,
            n_key_value_heads=kv_heads if group > 1 else None,
            dtype=dtype,
        )
        self.batch = batch
        self.cache = KeyValueCache.init_cache(self.cfg, "cpu", batch, capacity=capacity)
        self.reference = ReferenceCache(self.cfg, batch)
        self.generator = torch.Generator().manual_seed(seed)
        # Per layer, the most positions ever asked for: what capacity is measured against.
        self.needed = [capacity] * n_layers

    def new_kv(self, tokens: int) -> tuple[Tensor, Tensor]:
        shape = (self.batch, tokens, self.cfg.n_kv_heads, self.cfg.d_head)
        keys = torch.randn(shape, generator=self.generator).to(self.cfg.dtype)
        values = torch.randn(shape, generator=self.generator).to(self.cfg.dtype)
        return keys, values

    def new_mask(self, tokens: int) -> Tensor:
        return torch.randint(0, 2, (self.batch, tokens), generator=self.generator)

    def append_mask(self, tokens: int) -> None:
        mask = self.new_mask(tokens)
        assert_same(
            self.cache.append_attention_mask(mask), self.reference.append_attention_mask(mask)
        )

    @rule(tokens=st.integers(1, MAX_NEW_TOKENS), with_mask=st.booleans())
    def forward(self, tokens, with_mask):
        """What a forward pass does: the mask once, then keys and values in every layer."""
        if with_mask:
            self.append_mask(tokens)
        for i, (entry, ref) in enumerate(
            zip(self.cache.entries, self.reference.entries, strict=True)
        ):
            self.needed[i] = max(self.needed[i], entry.length + tokens)
            keys, values = self.new_kv(tokens)
            out_keys, out_values = entry.append(keys, values)
            ref_keys, ref_values = ref.append(keys, values)
            # Compared now: views returned by a frozen append are valid until the next append.
            assert_same(out_keys, ref_keys)
            assert_same(out_values, ref_values)

    @rule(tokens=st.integers(1, MAX_NEW_TOKENS))
    def mask_only(self, tokens):
        self.append_mask(tokens)

    @rule()
    def freeze(self):
        self.cache.freeze()
        self.reference.freeze()

    @rule()
    def unfreeze(self):
        self.cache.unfreeze()
        self.reference.unfreeze()

    @rule(data=st.data())
    def toggle_one_entry(self, data):
        layer = data.draw(st.integers(0, self.cfg.n_layers - 1), label="layer")
        frozen = not self.cache[layer].frozen
        self.cache[layer].frozen = frozen
        self.reference.entries[layer].frozen = frozen

    @rule(
        tokens=st.integers(1, MAX_NEW_TOKENS),
        wrong=st.sampled_from(["batch", "heads", "d_head", "dtype", "pair", "rank"]),
    )
    def rejected_append(self, tokens, wrong):
        """A bad append raises and changes nothing (the invariants then compare everything)."""
        keys, values = self.new_kv(tokens)
        if wrong == "batch":
            keys, values = keys.repeat(2, 1, 1, 1), values.repeat(2, 1, 1, 1)
        elif wrong == "heads":
            keys, values = keys.repeat(1, 1, 2, 1), values.repeat(1, 1, 2, 1)
        elif wrong == "d_head":
            keys, values = keys.repeat(1, 1, 1, 2), values.repeat(1, 1, 1, 2)
        elif wrong == "dtype":
            keys, values = keys.double(), values.double()
        elif wrong == "pair":
            values = torch.cat([values, values], dim=1)
        else:
            keys, values = keys[0], values[0]
        entry = self.cache[-1]
        capacity = entry.capacity
        with pytest.raises((ValueError, TypeError)):
            entry.append(keys, values)
        assert entry.capacity == capacity

    @rule(tokens=st.integers(1, MAX_NEW_TOKENS))
    def rejected_mask(self, tokens):
        with pytest.raises(ValueError):
            self.cache.append_attention_mask(torch.ones(self.batch + 1, tokens, dtype=torch.long))

    @precondition(lambda self: self.cache.seq_len < 64)
    @rule(extra=st.integers(0, 40))
    def reserve(self, extra):
        capacity = self.cache.seq_len + extra
        self.cache.reserve(capacity)
        self.needed = [max(n, capacity) for n in self.needed]

    @invariant()
    def same_tensors(self):
        assert self.cache.frozen == self.reference.frozen
        assert_same(self.cache.previous_attention_mask, self.reference.previous_attention_mask)
        for entry, ref in zip(self.cache.entries, self.reference.entries, strict=True):
            assert entry.frozen == ref.frozen
            assert entry.past_keys.dtype == self.cfg.dtype
            assert_same(entry.past_keys, ref.past_keys)
            assert_same(entry.past_values, ref.past_values)
            assert entry.length == ref.past_keys.shape[1]
            assert entry.past_keys._base is entry._keys  # a view, never a copy

    @invariant()
    def storage_grows_geometrically(self):
        for entry, needed in zip(self.cache.entries, self.needed, strict=True):
            # Room for what was asked, and at most twice that (or the minimum allocation).
            assert needed <= entry.capacity <= max(MIN_CAPACITY, 2 * needed)


CacheMatchesReference.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestCacheMatchesReference = CacheMatchesReference.TestCase
