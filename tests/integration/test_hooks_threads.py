"""Hooks are state of the model object, shared by every thread that runs it (as in TransformerLens).

A ``hooks()`` block open in one thread changes what another thread computes with the same model;
a ``copy.deepcopy`` of the model is hooked independently. The threads meet at events, never
sleeps, so each test runs the same way every time.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from tests.tiny_models import tiny_llama_with_tokenizer

from kvlens.chat import ChatSession
from kvlens.model import HookedTransformer

HOOK_NAME = "blocks.0.hook_resid_post"
WAIT_S = 60.0  # a thread that does not reach an event by then fails the test instead of hanging


@pytest.fixture(scope="module")
def model() -> HookedTransformer:
    return tiny_llama_with_tokenizer(n_ctx=256)


@pytest.fixture(scope="module")
def tokens(model: HookedTransformer) -> torch.Tensor:
    return model.to_tokens("The quick brown fox jumps over the lazy dog")


class ZeroResidual:
    """A hook that zeroes the residual stream and records the threads it ran in."""

    def __init__(self) -> None:
        self.thread_ids: set[int] = set()

    def __call__(self, tensor: torch.Tensor, *, hook: object) -> torch.Tensor:
        self.thread_ids.add(threading.get_ident())
        return torch.zeros_like(tensor)


@contextmanager
def hooks_open_in_another_thread(model: HookedTransformer, hook: ZeroResidual) -> Iterator[None]:
    """Hold ``model.hooks([(HOOK_NAME, hook)])`` open in a second thread for the body's duration."""
    entered, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def hold() -> None:
        try:
            with model.hooks(fwd_hooks=[(HOOK_NAME, hook)]):
                entered.set()
                if not release.wait(WAIT_S):
                    raise TimeoutError("the main thread never released the hooks block")
        except BaseException as error:  # reported in the main thread
            errors.append(error)
            entered.set()

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    try:
        assert entered.wait(WAIT_S), "the other thread never opened its hooks block"
        assert not errors, errors
        yield
    finally:
        release.set()
        thread.join(WAIT_S)
    assert not thread.is_alive(), "the other thread never closed its hooks block"
    assert not errors, errors


def test_a_hooks_block_in_another_thread_changes_this_threads_forward_pass(model, tokens):
    clean = model(tokens)
    hook = ZeroResidual()
    with hooks_open_in_another_thread(model, hook):
        hooked = model(tokens)
    assert threading.get_ident() in hook.thread_ids  # the other thread's hook ran here
    assert not torch.allclose(hooked, clean)
    torch.testing.assert_close(model(tokens), clean)  # closing the block detached it for all


def test_a_hooks_block_in_another_thread_changes_the_text_generated_here(model):
    def generate() -> str:
        return str(
            model.generate("Once upon a time", max_new_tokens=6, do_sample=False, verbose=False)
        )

    clean = generate()
    with hooks_open_in_another_thread(model, ZeroResidual()):
        hooked = generate()
    assert hooked != clean
    assert generate() == clean


def test_a_hooks_block_opened_mid_answer_changes_the_rest_of_the_answer(model):
    pieces = list(ChatSession(model).send("Hello there", max_new_tokens=10))
    assert len(pieces) > 4
    stream = ChatSession(model).send("Hello there", max_new_tokens=10)
    before = [next(stream) for _ in range(3)]  # read with no hook attached
    with hooks_open_in_another_thread(model, ZeroResidual()):
        after = list(stream)  # each decode step sees the hooks attached at that moment
    assert before == pieces[:3]
    assert "".join(after) != "".join(pieces[3:])


def test_a_deepcopy_of_the_model_is_hooked_independently(model, tokens):
    clean = model(tokens)
    own = copy.deepcopy(model)  # made outside any hooks block, so it has no hook attached
    with hooks_open_in_another_thread(model, ZeroResidual()):
        torch.testing.assert_close(own(tokens), clean)
        assert not torch.allclose(model(tokens), clean)  # the hook is really open
    hook = ZeroResidual()
    with hooks_open_in_another_thread(own, hook):
        torch.testing.assert_close(model(tokens), clean)
        assert not torch.allclose(own(tokens), clean)
    assert threading.get_ident() in hook.thread_ids


def test_a_copy_made_inside_a_hooks_block_carries_its_hooks(model, tokens):
    clean = model(tokens)
    with model.hooks(fwd_hooks=[(HOOK_NAME, ZeroResidual())]):
        carried = copy.deepcopy(model)
    torch.testing.assert_close(model(tokens), clean)
    assert not torch.allclose(carried(tokens), clean)


def test_a_block_closing_first_in_another_thread_leaves_this_blocks_hooks(
    model: HookedTransformer,
) -> None:
    """Two overlapping blocks: each removes its own hooks on exit, whichever closes first."""
    point = model.hook_dict[HOOK_NAME]
    a_in, b_in = threading.Event(), threading.Event()

    def hook_a(x: torch.Tensor, hook: object) -> None:
        return None

    def hook_b(x: torch.Tensor, hook: object) -> None:
        return None

    def thread_a() -> None:
        with model.hooks([(HOOK_NAME, hook_a)]):
            a_in.set()
            assert b_in.wait(WAIT_S)

    worker = threading.Thread(target=thread_a)
    worker.start()
    assert a_in.wait(WAIT_S)
    with model.hooks([(HOOK_NAME, hook_b)]):
        b_in.set()
        worker.join(WAIT_S)
        assert not worker.is_alive()
        attached = [entry.hook for entry in point.fwd_hooks]
        assert hook_b in attached and hook_a not in attached
    assert point.fwd_hooks == [] and model.context_level == 0
