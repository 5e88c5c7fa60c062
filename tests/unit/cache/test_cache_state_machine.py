"""State-machine test: the cache's operations against a naive reference of plain tensors.

Random sequences of append, freeze, unfreeze, clone, select, repeat_interleave, crop, reset and
save-then-load must leave every layer's keys and values, the attention mask and the tokens equal
to those of a reference that slices, indexes and concatenates fresh tensors.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from torch import Tensor

from kvlens import KeyValueCache, ModelConfig

LAYERS, HEADS, D_HEAD, MAX_BATCH = 2, 2, 3, 6
CFG = ModelConfig(n_layers=LAYERS, d_model=6, n_heads=HEADS, d_head=D_HEAD, n_ctx=64, d_vocab=16)


class Reference:
    """Per-layer keys and values, mask and tokens as ``[batch, pos, ...]`` tensors."""

    def __init__(self, batch: int) -> None:
        shape = (batch, 0, HEADS, D_HEAD)
        self.keys = [torch.empty(shape) for _ in range(LAYERS)]
        self.values = [torch.empty(shape) for _ in range(LAYERS)]
        self.mask = torch.empty((batch, 0), dtype=torch.int32)
        self.tokens: Tensor | None = torch.empty((batch, 0), dtype=torch.long)
        self.frozen = False

    def map(self, fn) -> None:
        self.keys = [fn(t) for t in self.keys]
        self.values = [fn(t) for t in self.values]
        self.mask = fn(self.mask)
        if self.tokens is not None:
            self.tokens = fn(self.tokens)


class CacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp())
        self.saves = 0
        self.cache = KeyValueCache.init_cache(CFG, "cpu", batch_size=2)
        self.cache.tokens = torch.empty((2, 0), dtype=torch.long)
        self.ref = Reference(2)

    @property
    def seq_len(self) -> int:
        return self.ref.mask.shape[1]

    @property
    def batch(self) -> int:
        return self.ref.mask.shape[0]

    @rule(n=st.integers(1, 4), seed=st.integers(0, 2**16))
    def append(self, n, seed):
        gen = torch.Generator().manual_seed(seed)
        shape = (self.batch, n, HEADS, D_HEAD)
        mask = torch.randint(0, 2, (self.batch, n), generator=gen, dtype=torch.int32)
        tokens = torch.randint(0, 16, (self.batch, n), generator=gen)
        for i, entry in enumerate(self.cache.entries):
            keys, values = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
            entry.append(keys, values)
            if not self.ref.frozen:
                self.ref.keys[i] = torch.cat([self.ref.keys[i], keys], dim=1)
                self.ref.values[i] = torch.cat([self.ref.values[i], values], dim=1)
        self.cache.append_attention_mask(mask)
        if not self.ref.frozen:
            self.ref.mask = torch.cat([self.ref.mask, mask], dim=1)
            # The cache's token record is kept by whoever appends (prefill, generation).
            if self.cache.tokens is not None and self.ref.tokens is not None:
                self.cache.tokens = torch.cat([self.cache.tokens, tokens], dim=1)
                self.ref.tokens = torch.cat([self.ref.tokens, tokens], dim=1)

    @rule()
    def freeze(self):
        self.cache.freeze()
        self.ref.frozen = True

    @rule()
    def unfreeze(self):
        self.cache.unfreeze()
        self.ref.frozen = False

    @rule()
    def clone(self):
        old = self.cache
        self.cache = old.clone()
        # Scribble over the original: the clone must not share its storage.
        for entry in old.entries:
            entry._keys.fill_(7.0)
            entry._values.fill_(7.0)
        old._mask.storage.fill_(3)

    @rule(data=st.data())
    def select(self, data):
        indices = data.draw(
            st.lists(st.integers(0, self.batch - 1), min_size=1, max_size=MAX_BATCH)
        )
        self.cache.select(torch.tensor(indices))
        self.ref.map(lambda t: t[torch.tensor(indices)])

    @precondition(lambda self: self.batch * 2 <= MAX_BATCH)
    @rule(n=st.integers(1, 2))
    def repeat_interleave(self, n):
        self.cache.repeat_interleave(n)
        self.ref.map(lambda t: t.repeat_interleave(n, dim=0))

    @rule(data=st.data())
    def crop(self, data):
        length = data.draw(st.integers(-self.seq_len, self.seq_len))
        self.cache.crop(length)
        kept = length if length >= 0 else self.seq_len + length
        self.ref.map(lambda t: t[:, :kept])

    @rule(data=st.data())
    def crop_beyond_the_end_changes_nothing(self, data):
        length = data.draw(
            st.one_of(st.integers(self.seq_len + 1, 99), st.integers(-99, -self.seq_len - 1))
        )
        try:
            self.cache.crop(length)
        except ValueError:
            return
        raise AssertionError(f"crop({length}) of {self.seq_len} positions did not raise")

    @rule()
    def reset(self):
        self.cache.reset()
        self.ref.map(lambda t: t[:, :0])
        self.ref.tokens = None

    @rule()
    def save_and_load(self):
        path = self.dir / f"{self.saves}.kvcache"
        self.saves += 1
        self.cache.save(path)
        self.cache = KeyValueCache.load(path, CFG)

    @invariant()
    def equal_to_reference(self):
        cache, ref = self.cache, self.ref
        assert cache.seq_len == self.seq_len and cache.batch_size == self.batch
        assert cache.frozen == ref.frozen
        assert all(entry.frozen == ref.frozen for entry in cache.entries)
        assert torch.equal(cache.previous_attention_mask, ref.mask)
        for entry, keys, values in zip(cache.entries, ref.keys, ref.values, strict=True):
            assert torch.equal(entry.past_keys, keys)
            assert torch.equal(entry.past_values, values)
        if ref.tokens is None:
            assert cache.tokens is None
        else:
            assert cache.tokens is not None and torch.equal(cache.tokens, ref.tokens)
        assert cache.nbytes_used <= cache.nbytes


CacheMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestCacheStateMachine = CacheMachine.TestCase
