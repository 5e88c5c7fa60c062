"""Hooks know where they are: ``hook.pass_info`` gives positions, cache index and step."""

from __future__ import annotations

import torch
from tests.tiny_models import tiny_llama_with_tokenizer

from kvlens import KeyValueCache

MODEL = tiny_llama_with_tokenizer(seed=3)
GREEDY = dict(max_new_tokens=8, do_sample=False, stop_at_eos=False, verbose=False)


def prompt(batch: int = 2, pos: int = 5) -> torch.Tensor:
    return torch.randint(100, 5000, (batch, pos), generator=torch.Generator().manual_seed(1))


def test_generate_tells_hooks_the_step_and_positions() -> None:
    seen = []

    def record(x: torch.Tensor, hook) -> None:
        info = hook.pass_info
        seen.append((info.step, info.positions.tolist(), info.cache_start, info.n_new))

    tokens = prompt()
    with MODEL.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", record)]):
        MODEL.generate(tokens, **GREEDY)
    assert seen[0] == (0, [list(range(5))] * 2, 0, 5)
    for k, (step, positions, start, n_new) in enumerate(seen[1:], start=1):
        assert (step, positions, start, n_new) == (k, [[4 + k]] * 2, 4 + k, 1)
    assert len(seen) == 8  # the prompt and 7 tokens fed back
    assert MODEL.blocks[0].hook_resid_pre.pass_info is None  # between passes
    assert MODEL.generation_step is None


def test_padded_rows_count_positions_from_their_first_real_token() -> None:
    tokens = prompt()
    mask = torch.ones_like(tokens)
    mask[1, :2] = 0
    seen = []

    def record(x: torch.Tensor, hook) -> None:
        seen.append(hook.pass_info.positions.clone())

    cache = KeyValueCache.init_cache(MODEL.cfg, None, 2)
    with MODEL.hooks(fwd_hooks=[("hook_embed", record)]), torch.no_grad():
        MODEL(tokens, past_kv_cache=cache, attention_mask=mask)
        MODEL(tokens[:, :1], past_kv_cache=cache)
    assert seen[0].tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]]
    assert seen[1].tolist() == [[5], [3]]


def steer(where: str, vector: torch.Tensor, prompt_len: int):
    def hook(resid: torch.Tensor, hook) -> torch.Tensor:
        positions = hook.pass_info.positions  # [batch, pos]
        chosen = positions >= prompt_len if where == "generated" else positions < prompt_len
        return resid + chosen[..., None].to(resid.dtype) * vector

    return hook


def test_steering_only_generated_or_only_prompt_positions_is_the_same_with_and_without_cache():
    tokens = prompt(batch=1, pos=6)
    plain = MODEL.generate(tokens, **GREEDY)
    vector = 3.0 * torch.randn(MODEL.cfg.d_model, generator=torch.Generator().manual_seed(5))
    for where in ("generated", "prompt"):
        hook = [("blocks.1.hook_resid_pre", steer(where, vector, 6))]
        with MODEL.hooks(fwd_hooks=hook):
            cached = MODEL.generate(tokens, **GREEDY)
            uncached = MODEL.generate(tokens, use_past_kv_cache=False, **GREEDY)
        assert torch.equal(cached, uncached), where
        assert not torch.equal(cached, plain), where  # the steering does something


def test_a_pass_run_from_a_hook_leaves_the_callers_info() -> None:
    tokens = prompt(batch=1)
    inner = []

    def nested(x: torch.Tensor, hook) -> None:
        if hook.pass_info.n_new == 5:
            with torch.no_grad():
                MODEL.blocks[0].hook_resid_pre.remove_hooks()
                MODEL(tokens[:, :2])
            inner.append(hook.pass_info.n_new)

    with MODEL.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", nested)]), torch.no_grad():
        MODEL(tokens)
    assert inner == [5]
