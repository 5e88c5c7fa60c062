"""Multi-turn chat keeps the history in the cache and prefills only each turn's new tokens."""

import pytest
import torch
from tests.tiny_models import tiny_llama_with_tokenizer

from kvlens.chat import ChatSession
from kvlens.generate import prefill


@pytest.fixture(scope="module")
def model():
    return tiny_llama_with_tokenizer(n_ctx=512)


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
    _, fresh = prefill(model, tokens)
    for layer in range(model.cfg.n_layers):
        torch.testing.assert_close(chat.cache[layer].past_keys, fresh[layer].past_keys)
        torch.testing.assert_close(chat.cache[layer].past_values, fresh[layer].past_values)


def test_reset_forgets_the_history(model):
    chat = ChatSession(model)
    chat.ask("One", max_new_tokens=3)
    chat.reset()
    assert chat.cache is None and chat.tokens == [] and chat.tokens_prefilled == 0
    assert chat.history() == []


def test_empty_message_is_refused(model):
    with pytest.raises(ValueError, match="empty"):
        ChatSession(model).ask("")
