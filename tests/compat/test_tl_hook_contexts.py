"""Hook lifetimes: ``hooks()`` nesting, permanent hooks, ``reset_hooks`` levels, as in TL.

Each scenario runs on both models and lists, after each step, the hooks a forward pass fired.
The expected lists spell out TL 2.18's semantics; kvlens must give the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from tests.compat.pairs import Pair, model_pair, random_tokens

POINT = "blocks.0.hook_resid_post"
TOKENS = random_tokens(0, 1, 4)

Scenario = Callable[[Any, Callable[[], list[str]], Callable[[str], Any]], list[list[str]]]


def play(model: Any, scenario: Scenario) -> list[list[str]]:
    """Run ``scenario(model, run, tag)``; ``run()`` does a forward pass and returns the labels
    of the hooks it fired, ``tag(label)`` makes a hook that reports ``label``."""
    fired: list[str] = []

    def tag(label: str) -> Any:
        def hook(tensor: torch.Tensor, hook: Any) -> None:
            fired.append(label)

        return hook

    def run() -> list[str]:
        fired.clear()
        model(TOKENS)
        return list(fired)

    return scenario(model, run, tag)


def nested_blocks(m: Any, run: Any, tag: Any) -> list[list[str]]:
    seen = []
    with m.hooks([(POINT, tag("outer"))]):
        seen.append(run())
        with m.hooks([(POINT, tag("inner"))]):
            seen.append(run())
        seen.append(run())
    seen.append(run())
    return seen


def add_hook_inside_block(m: Any, run: Any, tag: Any) -> list[list[str]]:
    seen = []
    with m.hooks([(POINT, tag("block"))]):
        m.add_hook(POINT, tag("added"))
        seen.append(run())
    seen.append(run())  # add_hook's hook belongs to no block: it stays
    m.reset_hooks()
    seen.append(run())
    return seen


def reset_inside_block(m: Any, run: Any, tag: Any) -> list[list[str]]:
    seen = []
    m.add_hook(POINT, tag("before"))
    with m.hooks([(POINT, tag("block"))]):
        seen.append(run())
        m.reset_hooks()  # removes every temporary hook, the outer one too
        seen.append(run())
    seen.append(run())  # nothing comes back when the block ends
    return seen


def permanent_hooks(m: Any, run: Any, tag: Any) -> list[list[str]]:
    seen = []
    m.add_hook(POINT, tag("perm"), is_permanent=True)
    m.add_hook(POINT, tag("temp"))
    seen.append(run())
    m.reset_hooks()
    seen.append(run())
    with m.hooks([(POINT, tag("block"))]):
        m.add_perma_hook(POINT, tag("perm2"))
        seen.append(run())
    seen.append(run())
    m.reset_hooks(including_permanent=True)
    seen.append(run())
    return seen


def reset_by_level(m: Any, run: Any, tag: Any) -> list[list[str]]:
    seen = []
    assert m.context_level == 0
    with m.hooks([(POINT, tag("one"))]):
        with m.hooks([(POINT, tag("two"))]):
            assert m.context_level == 2
            m.reset_hooks(level=1)
            seen.append(run())
            m.reset_hooks(level=2)
            seen.append(run())
        seen.append(run())
    assert m.context_level == 0
    return seen


def keep_hooks_at_end(m: Any, run: Any, tag: Any) -> list[list[str]]:
    seen = []
    m.run_with_hooks(TOKENS, fwd_hooks=[(POINT, tag("kept_run"))], reset_hooks_end=False)
    with m.hooks([(POINT, tag("kept_block"))], reset_hooks_end=False):
        pass
    seen.append(run())
    m.reset_hooks()
    seen.append(run())
    return seen


def run_with_hooks_inside_block(m: Any, run: Any, tag: Any) -> list[list[str]]:
    seen = []
    with m.hooks([(POINT, tag("block"))]):
        m.run_with_hooks(TOKENS, fwd_hooks=[(POINT, tag("run"))])
        seen.append(run())  # run_with_hooks removed only its own hook
    seen.append(run())
    return seen


def exception_in_block(m: Any, run: Any, tag: Any) -> list[list[str]]:
    with pytest.raises(RuntimeError), m.hooks([(POINT, tag("block"))]):
        raise RuntimeError("inside the block")
    assert m.context_level == 0
    return [run()]


def prepend_and_filters(m: Any, run: Any, tag: Any) -> list[list[str]]:
    seen = []
    m.add_hook(POINT, tag("a"))
    m.add_hook(POINT, tag("b"), prepend=True)
    m.add_hook(lambda name: name.endswith("hook_resid_post"), tag("every_block"))
    seen.append(run())
    return seen


SCENARIOS: dict[str, tuple[Scenario, list[list[str]]]] = {
    "nested_blocks": (nested_blocks, [["outer"], ["outer", "inner"], ["outer"], []]),
    "add_hook_inside_block": (add_hook_inside_block, [["block", "added"], ["added"], []]),
    "reset_inside_block": (reset_inside_block, [["before", "block"], [], []]),
    "permanent_hooks": (
        permanent_hooks,
        [["perm", "temp"], ["perm"], ["perm", "block", "perm2"], ["perm", "perm2"], []],
    ),
    "reset_by_level": (reset_by_level, [["two"], [], []]),
    "keep_hooks_at_end": (keep_hooks_at_end, [["kept_run", "kept_block"], []]),
    "run_with_hooks_inside_block": (run_with_hooks_inside_block, [["block"], []]),
    "exception_in_block": (exception_in_block, [[]]),
    "prepend_and_filters": (prepend_and_filters, [["b", "a", "every_block", "every_block"]]),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_hook_lifetimes(name: str) -> None:
    pair: Pair = model_pair("gpt2")
    scenario, expected = SCENARIOS[name]
    for model in (pair.tl, pair.kv):
        model.reset_hooks(including_permanent=True)
        try:
            assert play(model, scenario) == expected, type(model).__module__
        finally:
            model.reset_hooks(including_permanent=True)


def test_hooks_yields_the_model() -> None:
    pair = model_pair("gpt2")
    for model in (pair.tl, pair.kv):
        with model.hooks() as hooked:
            assert hooked is model


def test_reset_hooks_by_direction() -> None:
    """``reset_hooks(direction=...)`` removes forward or backward hooks only."""
    pair = model_pair("gpt2")
    for model in (pair.tl, pair.kv):
        fired: list[str] = []
        model.add_hook(POINT, lambda t, hook, f=fired: f.append("fwd"))
        model.add_hook(POINT, lambda g, hook, f=fired: f.append("bwd"), dir="bwd")
        model.reset_hooks(direction="fwd")
        model(TOKENS, return_type="loss").backward()
        model.reset_hooks(direction="bwd")
        model(TOKENS, return_type="loss").backward()
        model.zero_grad(set_to_none=True)
        assert fired == ["bwd"], type(model).__module__
