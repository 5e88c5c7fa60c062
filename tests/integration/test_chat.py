"""Multi-turn chat keeps the history in the cache and prefills only each turn's new tokens.

A turn is all or nothing: a stream closed early, interrupted or failing leaves the session as it
was before the turn, so the next turn equals that turn on a session that never saw it.
"""

from collections.abc import Callable

import pytest
import torch
from tests.tiny_models import tiny_llama_with_tokenizer

from kvlens.chat import ChatSession
from kvlens.generate import run_prompt
from kvlens.sampling import SamplingConfig

END_OF_TURN = "<|im_end|>\n"  # what SmolLM2's template writes after an answer, not yet prefilled


@pytest.fixture(scope="module")
def model():
    return tiny_llama_with_tokenizer(n_ctx=512)


def assert_history_matches_cache(chat: ChatSession) -> None:
    """The history rendered by the chat template is the text the cache holds, end of turn aside.

    Compared as text: a random model's answers are token sequences that re-tokenizing them
    would not give back.
    """
    tokenizer = chat.model.tokenizer
    rendered = tokenizer.apply_chat_template(chat.history(), tokenize=False)
    held = tokenizer.decode(chat.tokens, skip_special_tokens=False)
    assert rendered == held + END_OF_TURN
    assert chat.cache is not None
    assert chat.cache.seq_len == len(chat.tokens)
    assert chat.cache.tokens is not None
    assert chat.cache.tokens[0].tolist() == chat.tokens


def assert_same_session(chat: ChatSession, reference: ChatSession) -> None:
    assert chat.history() == reference.history()
    assert chat.tokens == reference.tokens
    assert chat.tokens_prefilled == reference.tokens_prefilled
    assert chat.cache is not None and reference.cache is not None
    for layer in range(chat.model.cfg.n_layers):
        torch.testing.assert_close(chat.cache[layer].past_keys, reference.cache[layer].past_keys)
        torch.testing.assert_close(
            chat.cache[layer].past_values, reference.cache[layer].past_values
        )
    torch.testing.assert_close(
        chat.cache.previous_attention_mask, reference.cache.previous_attention_mask
    )


def test_second_turn_prefills_only_its_own_tokens(model):
    chat = ChatSession(model)
    chat.ask("What is the capital of France?", max_new_tokens=6)
    after_first = chat.tokens_prefilled
    history = len(chat.tokens)
    assert after_first > 0
    assert chat.cache.seq_len == history

    chat.ask("And of Italy?", max_new_tokens=6)
    second_turn = chat.tokens_prefilled - after_first
    # The second turn prefilled its own message and the template around it, not the history.
    delta_ids = model.tokenizer.encode(
        "<|im_end|>\n<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n",
        add_special_tokens=False,
    )
    assert second_turn <= len(delta_ids)
    assert second_turn < history
    assert chat.cache.seq_len == len(chat.tokens)
    assert [m["role"] for m in chat.history()] == ["user", "assistant"] * 2


def test_cache_after_two_turns_equals_a_fresh_prefill_of_the_same_tokens(model):
    chat = ChatSession(model, system_prompt="Be brief.")
    chat.ask("Hi there", max_new_tokens=5)
    chat.ask("Tell me more", max_new_tokens=5)
    tokens = torch.tensor([chat.tokens])
    _, fresh = run_prompt(model, tokens)
    for layer in range(model.cfg.n_layers):
        torch.testing.assert_close(chat.cache[layer].past_keys, fresh[layer].past_keys)
        torch.testing.assert_close(chat.cache[layer].past_values, fresh[layer].past_values)


def test_history_matches_the_cache_after_every_turn(model):
    chat = ChatSession(model, system_prompt="Be brief.")
    for message in ("Hi there", "Tell me more", "Thanks"):
        chat.ask(message, max_new_tokens=6)
        assert_history_matches_cache(chat)


def test_reset_forgets_the_history(model):
    chat = ChatSession(model)
    chat.ask("One", max_new_tokens=3)
    chat.reset()
    assert chat.cache is None and chat.tokens == [] and chat.tokens_prefilled == 0
    assert chat.history() == []


def test_empty_message_is_refused(model):
    with pytest.raises(ValueError, match="empty"):
        ChatSession(model).ask("")


# Rolling back a turn that did not finish ---------------------------------------------------------

FIRST, DROPPED, NEXT = "What is the capital of France?", "Tell me a long story", "And of Italy?"


def _raise_on_call(n: int, error: BaseException) -> Callable[..., None]:
    """A hook that raises ``error`` on its ``n``-th call (1 is the turn's prefill)."""
    calls = 0

    def hook(tensor: torch.Tensor, *, hook) -> None:
        nonlocal calls
        calls += 1
        if calls == n:
            raise error

    return hook


def _close_after_two_pieces(chat: ChatSession) -> None:
    stream = chat.send(DROPPED, max_new_tokens=20)
    next(stream), next(stream)
    stream.close()


def _break_out_of_the_loop(chat: ChatSession) -> None:
    for i, _ in enumerate(chat.send(DROPPED, max_new_tokens=20)):
        if i == 2:
            break  # the stream, referenced by nothing now, is closed by the GC


def _close_after_the_last_piece(chat: ChatSession) -> None:
    """Every piece of the answer read, but the stream not read to its end."""
    reference = ChatSession(chat.model)
    reference.ask(FIRST, max_new_tokens=8)
    whole = reference.ask(DROPPED, max_new_tokens=20)
    stream, text = chat.send(DROPPED, max_new_tokens=20), ""
    while text != whole:
        text += next(stream)
    stream.close()


def _keyboard_interrupt_thrown_in(chat: ChatSession) -> None:
    stream = chat.send(DROPPED, max_new_tokens=20)
    next(stream)
    with pytest.raises(KeyboardInterrupt):
        stream.throw(KeyboardInterrupt())


def _keyboard_interrupt_from_a_hook(chat: ChatSession) -> None:
    hook = _raise_on_call(4, KeyboardInterrupt())
    with (
        chat.model.hooks(fwd_hooks=[("blocks.1.hook_resid_post", hook)]),
        pytest.raises(KeyboardInterrupt),
    ):
        chat.ask(DROPPED, max_new_tokens=20)


def _error_in_the_prefill_between_layers(chat: ChatSession) -> None:
    """The pass fails after layer 0 stored the turn's tokens, before layer 1 did."""
    hook = _raise_on_call(1, RuntimeError("model failed"))
    with (
        chat.model.hooks(fwd_hooks=[("blocks.1.attn.hook_q", hook)]),
        pytest.raises(RuntimeError, match="model failed"),
    ):
        chat.ask(DROPPED, max_new_tokens=20)


def _error_in_a_decode_step(chat: ChatSession) -> None:
    hook = _raise_on_call(3, RuntimeError("model failed"))
    with (
        chat.model.hooks(fwd_hooks=[("blocks.1.attn.hook_q", hook)]),
        pytest.raises(RuntimeError, match="model failed"),
    ):
        chat.ask(DROPPED, max_new_tokens=20)


def _context_full(chat: ChatSession) -> None:
    with pytest.raises(ValueError, match="fills the model's context"):
        chat.ask("word " * 600)


ENDINGS = [
    _close_after_two_pieces,
    _break_out_of_the_loop,
    _close_after_the_last_piece,
    _keyboard_interrupt_thrown_in,
    _keyboard_interrupt_from_a_hook,
    _error_in_the_prefill_between_layers,
    _error_in_a_decode_step,
    _context_full,
]


@pytest.mark.parametrize("end_early", ENDINGS, ids=lambda f: f.__name__.strip("_"))
def test_an_unfinished_turn_is_rolled_back(model, end_early):
    chat = ChatSession(model)
    chat.ask(FIRST, max_new_tokens=8)
    before = (chat.history(), list(chat.tokens), chat.cache.seq_len, chat.tokens_prefilled)

    end_early(chat)

    assert (chat.history(), chat.tokens, chat.cache.seq_len, chat.tokens_prefilled) == before
    assert_history_matches_cache(chat)
    answer = chat.ask(NEXT, max_new_tokens=8)
    assert_history_matches_cache(chat)

    reference = ChatSession(model)  # the same conversation without the unfinished turn
    reference.ask(FIRST, max_new_tokens=8)
    assert answer == reference.ask(NEXT, max_new_tokens=8)
    assert_same_session(chat, reference)


def test_a_stream_left_open_is_rolled_back_by_the_next_turn(model):
    chat = ChatSession(model)
    chat.ask(FIRST, max_new_tokens=8)
    stream = chat.send(DROPPED, max_new_tokens=20)
    next(stream), next(stream)  # still referenced, so the GC does not close it
    answer = chat.ask(NEXT, max_new_tokens=8)
    with pytest.raises(StopIteration):  # closed: reading on neither resumes nor keeps the turn
        next(stream)

    reference = ChatSession(model)
    reference.ask(FIRST, max_new_tokens=8)
    assert answer == reference.ask(NEXT, max_new_tokens=8)
    assert_same_session(chat, reference)
    assert_history_matches_cache(chat)


def test_reset_rolls_back_a_turn_left_open_first(model):
    chat = ChatSession(model)
    chat.ask(FIRST, max_new_tokens=8)
    stream = chat.send(DROPPED, max_new_tokens=20)
    next(stream)
    chat.reset()
    del stream  # closing it now must not bring back the conversation reset forgot
    assert chat.history() == [] and chat.cache is None and chat.tokens == []


def test_a_stream_never_read_changes_nothing(model):
    chat = ChatSession(model)
    chat.ask(FIRST, max_new_tokens=8)
    before = chat.history()
    chat.send(DROPPED)
    assert chat.history() == before
    assert_history_matches_cache(chat)


def test_a_turn_is_refused_while_another_is_being_generated(model):
    chat = ChatSession(model)
    chat.ask(FIRST, max_new_tokens=8)
    before = chat.history()

    def send_from_inside(tensor: torch.Tensor, *, hook) -> None:
        chat.send(NEXT)

    with (
        model.hooks(fwd_hooks=[("blocks.1.hook_resid_post", send_from_inside)]),
        pytest.raises(RuntimeError, match="one turn at a time"),
    ):
        chat.ask(DROPPED)
    assert chat.history() == before
    assert_history_matches_cache(chat)


def test_seeded_sampling_after_a_rolled_back_turn_equals_a_session_without_it(model):
    sampling = SamplingConfig(do_sample=True, temperature=1.0)
    chat = ChatSession(model, sampling=sampling, seed=3)
    chat.ask(FIRST, max_new_tokens=8)
    _break_out_of_the_loop(chat)  # draws random numbers, then is rolled back with them
    answer = chat.ask(NEXT, max_new_tokens=8)

    reference = ChatSession(model, sampling=sampling, seed=3)
    reference.ask(FIRST, max_new_tokens=8)
    assert answer == reference.ask(NEXT, max_new_tokens=8)
    assert_same_session(chat, reference)


def test_an_answer_with_a_special_token_is_prefilled_afresh_by_the_next_turn(model, monkeypatch):
    """The history leaves the special token out; the next turn equals a fresh session's."""
    import kvlens.chat

    special = model.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    sample, calls = kvlens.chat.sample_logits, 0

    def sample_a_special_token_third(*args, **kwargs):
        nonlocal calls
        calls += 1
        return torch.tensor([special]) if calls == 3 else sample(*args, **kwargs)

    chat = ChatSession(model)
    with monkeypatch.context() as patch:
        patch.setattr(kvlens.chat, "sample_logits", sample_a_special_token_third)
        chat.ask(FIRST, max_new_tokens=8)
    assert special in chat.tokens
    assert "<|endoftext|>" not in chat.history()[-1]["content"]
    prefilled = chat.tokens_prefilled
    answer = chat.ask(NEXT, max_new_tokens=8)
    assert special not in chat.tokens  # the conversation was prefilled again from the history
    assert_history_matches_cache(chat)

    reference = ChatSession(model)
    reference.messages = chat.history()[:-2]  # the history before NEXT, on an empty cache
    assert answer == reference.ask(NEXT, max_new_tokens=8)
    assert chat.tokens == reference.tokens
    assert chat.tokens_prefilled == prefilled + reference.tokens_prefilled
