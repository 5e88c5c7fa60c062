"""Interventions give the same tokens with and without the key-value cache (issue 16, item 3).

Steering at every position, ablating a head, knocking out attention to the token itself, and
patching activations recorded on another prompt at chosen absolute positions: ``generate`` with
``use_past_kv_cache=True`` (prefill, then one-token decode steps that see ``[batch, 1, ...]``)
gives exactly the tokens of ``use_past_kv_cache=False`` (the whole sequence rerun every step),
on the tiny models of every family (learned positions, parallel rotary, grouped-query, sliding
windows, Gemma 2's soft caps) and on the real default model. Every case also checks that the
intervention changes the tokens, so that the equality says something.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from tests.helpers import WINDOW_OVERRIDES, make_hf_model, tiny_tokenizer
from torch import Tensor

from kvlens.model import HookedTransformer

Hooks = list[tuple[Any, Callable[..., Any]]]

# Learned positions, parallel rotary, grouped-query, sliding windows (Mistral: every layer with
# one key/value head; Qwen2: from layer 1 on), Gemma 2 (local and global layers, soft caps).
TINY_FAMILIES = ("gpt2", "pythia", "llama", "mistral", "qwen2", "gemma2")
NEW = 10  # past the tiny windows (5 and 6 keys) with the prompts below
# Two prompts of different lengths (8 and 4 tokens with BOS): the batch is left-padded.
PROMPTS = ["w5 w17 w33 w8 w61 w9 w40", "w70 w12 w3"]
SOURCE = "w44 w90 w23 w51 w66 w19 w80 w27 w35 w72 w14 w58"  # 13 tokens with BOS
# Absolute positions patched: in the prompt of both rows (1, 3), in the first row's prompt and
# the second row's generated tokens (5), generated in both rows (9).
PATCH_POSITIONS = (1, 3, 5, 9)
GREEDY = dict(do_sample=False, stop_at_eos=False, return_type="tokens", verbose=False)


@functools.cache
def tiny(family: str) -> HookedTransformer:
    """A tiny random model of ``family`` with the word-level test tokenizer (``w3 .. w96``)."""
    hf_model = make_hf_model(family, **WINDOW_OVERRIDES.get(family, {}))
    return HookedTransformer.from_hf_model(hf_model, tokenizer=tiny_tokenizer())


def generate(model: HookedTransformer, input: Any, hooks: Hooks, cached: bool, **kw: Any) -> Tensor:
    options = {**GREEDY, "max_new_tokens": NEW, **kw}
    with model.hooks(fwd_hooks=hooks):
        return model.generate(input, use_past_kv_cache=cached, **options)


def vector(model: HookedTransformer, scale: float, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(model.cfg.d_model, generator=gen)


# Interventions: each builds its hooks for a model, given the source prompt (for patching).


def steer(point: str, scale: float) -> Callable[[HookedTransformer, Any], Hooks]:
    """Add a fixed vector at every position of ``point`` of layer 0, prompt and generated
    tokens alike."""

    def build(model: HookedTransformer, source: Any) -> Hooks:
        v = vector(model, scale)
        return [(f"blocks.0.{point}", lambda x, hook: x + v)]

    return build


def ablate_head(point: str, head: int) -> Callable[[HookedTransformer, Any], Hooks]:
    """Zero one head (``hook_z``: a query head; ``hook_v``: a key/value head) of layer 0."""

    def zero(x: Tensor, hook: Any) -> Tensor:
        x[:, :, head] = 0.0  # [batch, pos, head, d_head]
        return x

    return lambda model, source: [(f"blocks.0.attn.{point}", zero)]


def knock_out_self_attention(head: int) -> Callable[[HookedTransformer, Any], Hooks]:
    """Head ``head`` of layer 0 gives no weight to the query's own key (the pattern's diagonal
    in cache indices: query ``i`` of a pass sits at key ``cache_start + i``)."""

    def hook(pattern: Tensor, hook: Any) -> Tensor:
        keys = hook.pass_info.cache_indices  # [query_pos]
        queries = torch.arange(keys.shape[0], device=keys.device)
        pattern = pattern.clone()  # [batch, head, query_pos, key_pos]
        pattern[:, head, queries, keys] = 0.0
        return pattern

    return lambda model, source: [("blocks.0.attn.hook_pattern", hook)]


def patch(
    point: str, head: int | None = None, record: list | None = None
) -> Callable[[HookedTransformer, Any], Hooks]:
    """Replace ``point`` of layer 0 at the absolute positions ``PATCH_POSITIONS`` with
    its value on the source prompt at the same positions (only ``head`` for ``hook_z``)."""

    def build(model: HookedTransformer, source: Any) -> Hooks:
        name = f"blocks.0.{point}"
        _, acts = model.run_with_cache(source, names_filter=name)
        recorded = acts[name][0]  # [source_pos, ...]
        chosen_positions = torch.tensor(PATCH_POSITIONS)
        assert max(PATCH_POSITIONS) < recorded.shape[0]

        def hook(x: Tensor, hook: Any) -> Tensor:
            positions = hook.pass_info.positions  # [batch, pos]; [batch, 1] in a decode step
            chosen = torch.isin(positions, chosen_positions)
            if record is not None:
                info = hook.pass_info
                record.append((info.step, info.n_new, int(chosen.sum())))
            source_x = recorded[positions.clamp(max=recorded.shape[0] - 1)]
            if head is None:
                return torch.where(chosen[..., None], source_x, x)
            x = x.clone()  # [batch, pos, head, d_head]
            x[:, :, head] = torch.where(chosen[..., None], source_x[:, :, head], x[:, :, head])
            return x

        return [(name, hook)]

    return build


INTERVENTIONS: dict[str, Callable[[HookedTransformer, Any], Hooks]] = {
    "steer_resid_post": steer("hook_resid_post", 2.0),
    "steer_resid_pre": steer("hook_resid_pre", 2.0),
    "steer_attn_out": steer("hook_attn_out", 2.0),
    "ablate_z_head": ablate_head("hook_z", 1),
    "ablate_v_head": ablate_head("hook_v", 0),
    "knock_out_self_attention": knock_out_self_attention(0),
    "patch_resid_post": patch("hook_resid_post"),
    "patch_z_head": patch("attn.hook_z", head=2),
}


def prompt_inputs(model: HookedTransformer, kind: str) -> tuple[Any, dict[str, Any]]:
    """The batch as text (left-padded by ``generate``), or as token ids right-padded with their
    mask (``generate`` moves the padding to the front of each row)."""
    if kind == "text":
        return PROMPTS, {}
    tokens, mask = model.to_tokens_and_mask(PROMPTS, padding_side="right")
    assert not bool(mask.all())
    return tokens, {"attention_mask": mask}


@pytest.mark.parametrize("kind", ["text", "tokens_with_mask"])
@pytest.mark.parametrize("intervention", list(INTERVENTIONS))
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_greedy_tokens_with_and_without_cache(family: str, intervention: str, kind: str) -> None:
    model = tiny(family)
    input, kw = prompt_inputs(model, kind)
    hooks = INTERVENTIONS[intervention](model, SOURCE)
    plain = generate(model, input, [], cached=True, **kw)
    cached = generate(model, input, hooks, cached=True, **kw)
    uncached = generate(model, input, hooks, cached=False, **kw)
    assert cached.tolist() == uncached.tolist()
    assert cached.tolist() != plain.tolist(), "the intervention must change the tokens"
    assert all(not point.fwd_hooks for point in model.hook_dict.values())


@pytest.mark.parametrize("intervention", ["steer_resid_post", "ablate_z_head", "patch_resid_post"])
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_seeded_sampling_with_and_without_cache(family: str, intervention: str) -> None:
    model = tiny(family)
    hooks = INTERVENTIONS[intervention](model, SOURCE)
    sample = dict(do_sample=True, seed=1, temperature=1.0)
    plain = generate(model, PROMPTS, [], cached=True, **sample)
    cached = generate(model, PROMPTS, hooks, cached=True, **sample)
    uncached = generate(model, PROMPTS, hooks, cached=False, **sample)
    assert cached.tolist() == uncached.tolist()
    assert cached.tolist() != plain.tolist()


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_hooks_fire_at_every_decode_step(family: str) -> None:
    """The hooks run at every step, and the patch replaces generated positions in decode steps
    (one new token per row), so the cached run does intervene after the prompt."""
    model = tiny(family)
    calls: dict[str, list[tuple[int, int, int]]] = {}
    for cached in (True, False):
        patched: list[tuple[int, int, int]] = []
        hooks = patch("hook_resid_post", record=patched)(model, SOURCE)
        z_steps: list[tuple[int, int, int]] = []

        def ablate(z: Tensor, hook: Any, steps: list = z_steps) -> Tensor:
            steps.append((hook.pass_info.step, hook.pass_info.n_new, z.shape[1]))
            z[:, :, 1] = 0.0
            return z

        hooks.append(("blocks.0.attn.hook_z", ablate))
        generate(model, PROMPTS, hooks, cached=cached)
        calls[f"patch_{cached}"], calls[f"ablate_{cached}"] = patched, z_steps
    n_prompt = model.to_tokens(PROMPTS).shape[1]  # 8: the longer prompt with BOS
    # Cached: the prompt's pass, then NEW - 1 decode steps of one token per row.
    assert [(s, n) for s, n, _ in calls["ablate_True"]] == [(0, n_prompt)] + [
        (k, 1) for k in range(1, NEW)
    ]
    assert all(width == n for _, n, width in calls["ablate_True"])
    # Uncached: the same steps, each rerunning the whole sequence.
    assert [(s, n) for s, n, _ in calls["ablate_False"]] == [(k, n_prompt + k) for k in range(NEW)]
    # The patch replaced positions 1 and 3 of both rows (and 5 of the longer one) in the prompt,
    # then generated positions in decode steps: 5 and 9 in the short row, 9 in the long one.
    # Step k feeds position 7 + k of the long row and 3 + k of the short one.
    patched = calls["patch_True"]
    assert patched[0] == (0, n_prompt, 5)
    assert all(n_new == 1 for _, n_new, _ in patched[1:])
    assert [(step, hits) for step, _, hits in patched[1:] if hits] == [(2, 2), (6, 1)]


# The real default model: one short batch, few tokens.

DEFAULT_PROMPTS = ["The capital of France is", "Hi"]
DEFAULT_SOURCE = "My favourite city in the whole wide world is Rome, in Italy."
DEFAULT_NEW = 12


def steer_default(model: HookedTransformer, source: Any) -> Hooks:
    v = vector(model, 4.0)  # norm about 4 * sqrt(d_model) = 96
    return [("blocks.10.hook_resid_post", lambda x, hook: x + v)]


DEFAULT_INTERVENTIONS: dict[str, Callable[[HookedTransformer, Any], Hooks]] = {
    "steer_resid_post": steer_default,
    "ablate_z_head": ablate_head("hook_z", 3),
    "knock_out_self_attention": knock_out_self_attention(0),
    "patch_resid_post": patch("hook_resid_post"),
}


@pytest.fixture(scope="module")
def default_model() -> HookedTransformer:
    return HookedTransformer.from_pretrained(progress=False)


@pytest.fixture(scope="module")
def default_plain(default_model: HookedTransformer) -> Tensor:
    return generate(default_model, DEFAULT_PROMPTS, [], cached=True, max_new_tokens=DEFAULT_NEW)


@pytest.mark.slow
@pytest.mark.parametrize("intervention", list(DEFAULT_INTERVENTIONS))
def test_default_model_with_and_without_cache(
    default_model: HookedTransformer, default_plain: Tensor, intervention: str
) -> None:
    model = default_model
    hooks = DEFAULT_INTERVENTIONS[intervention](model, DEFAULT_SOURCE)
    cached = generate(model, DEFAULT_PROMPTS, hooks, cached=True, max_new_tokens=DEFAULT_NEW)
    uncached = generate(model, DEFAULT_PROMPTS, hooks, cached=False, max_new_tokens=DEFAULT_NEW)
    assert cached.tolist() == uncached.tolist()
    assert cached.tolist() != default_plain.tolist(), "the intervention must change the tokens"
