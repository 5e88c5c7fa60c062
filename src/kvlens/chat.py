"""Multi-turn chat that keeps the conversation in the key-value cache.

Each turn prefills only its own new tokens: the text the chat template adds after what the cache
already holds (the end of the last answer, the new user message, the assistant header). The
answers the model produced stay in the cache as the tokens it produced.

A turn is all or nothing. It is kept when its stream is read to the end; a stream closed earlier
(``close()``, a ``break`` that drops it, a new :meth:`ChatSession.send`), or interrupted by an
exception (``KeyboardInterrupt``, an error in the model or a hook, one thrown in by the
consumer), rolls the session back to exactly where it was before the turn.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from kvlens.cache import KeyValueCache
from kvlens.decode import decode_step, run_prompt
from kvlens.sampling import SamplingConfig, sample_logits
from kvlens.tokens import stream_decode

if TYPE_CHECKING:
    from kvlens.model import HookedTransformer


@dataclass(frozen=True)
class _Before:
    """What a turn changes, as it was before the turn: enough to undo the turn."""

    n_messages: int
    cache: KeyValueCache | None
    seq_len: int
    tokens: list[int]
    n_tokens: int
    tokens_prefilled: int
    rng_state: torch.Tensor | None


class ChatSession:
    """A conversation with a model whose history lives in a :class:`KeyValueCache`.

    Between turns, :meth:`history` rendered by the chat template is the text the cache holds,
    followed by the end-of-turn text after the last answer (which the next turn prefills). The
    answers in the history are the decoded text without special tokens; if an answer held one,
    the next turn sees that the history no longer extends the cache and prefills it afresh.

    One turn runs at a time: :meth:`send` closes (and so rolls back) a turn still open, and a
    session is not meant to be shared by threads.

    Args:
        model: A model with a tokenizer that has a chat template.
        system_prompt: Optional system message.
        sampling: How tokens are chosen (default greedy).
        seed: Seed for sampling.

    Attributes:
        cache: The cache holding the conversation (``None`` before the first turn).
        tokens: Every token the cache holds, in order.
        tokens_prefilled: Prompt tokens run through the model so far (not counting the turns
            rolled back).
    """

    def __init__(
        self,
        model: HookedTransformer,
        system_prompt: str | None = None,
        sampling: SamplingConfig | None = None,
        seed: int | None = None,
    ) -> None:
        tokenizer = model.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat needs a model whose tokenizer has a chat template")
        self.model = model
        self.system_prompt = system_prompt
        self.sampling = sampling or SamplingConfig(do_sample=False)
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)
        self._open: weakref.ref[Generator[str, None, None]] | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (and empty the cache); a turn still open is rolled back first."""
        self._close_open_turn()
        self.messages: list[dict[str, str]] = []
        if self.system_prompt:
            self.messages.append({"role": "system", "content": self.system_prompt})
        self.cache: KeyValueCache | None = None
        self._text = ""  # the text the cache holds (rendered prompt plus generated answers)
        self.tokens_prefilled = 0
        self.tokens: list[int] = []

    def _render(self, add_generation_prompt: bool) -> str:
        return str(
            self.model.tokenizer.apply_chat_template(
                self.messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        )

    def send(self, message: str, max_new_tokens: int = 256) -> Generator[str, None, None]:
        """Add a user message and stream the answer as text pieces.

        The turn (message and answer) is added to the history, and kept in the cache, when the
        stream is read to its end, i.e. when iterating it stops by itself. Closing the stream
        earlier rolls the turn back, even if its last piece was already read: use :meth:`ask`,
        or read the stream to the end, to keep a turn. An exception raised inside the turn, or
        thrown into the stream, rolls it back and propagates.

        Raises:
            ValueError: ``message`` is empty (at once), or the conversation fills the model's
                context (when the stream is first read).
            RuntimeError: Called while another turn of this session is being generated.
        """
        if not message:
            raise ValueError("message is empty")
        self._close_open_turn()
        turn = self._turn(message, max_new_tokens)
        self._open = weakref.ref(turn)  # weak: a stream the caller drops is closed by the GC
        return turn

    def _close_open_turn(self) -> None:
        """Close the last turn's stream if it is still open, rolling that turn back."""
        turn = self._open() if self._open is not None else None
        self._open = None
        if turn is None:
            return
        if inspect.getgeneratorstate(turn) == inspect.GEN_RUNNING:
            raise RuntimeError(
                "a turn of this ChatSession is being generated; a session runs one turn at a time"
            )
        turn.close()

    def _turn(self, message: str, max_new_tokens: int) -> Generator[str, None, None]:
        """:meth:`send`'s stream: the turn, undone by ``finally`` unless it ran to the end."""
        before = self._before()
        kept = False
        try:
            yield from self._generate(message, max_new_tokens)
            kept = True
        finally:  # also on GeneratorExit: close(), or the GC dropping an unfinished stream
            if not kept:
                self._roll_back(before)

    def _generate(self, message: str, max_new_tokens: int) -> Iterator[str]:
        self.messages.append({"role": "user", "content": message})
        prompt = self._render(add_generation_prompt=True)
        if self.cache is not None and prompt.startswith(self._text):
            new_text = prompt[len(self._text) :]
        else:  # first turn, or a template that rewrites earlier turns: start again
            self.cache, new_text, self.tokens = None, prompt, []
        tokenizer = self.model.tokenizer
        new_ids = tokenizer.encode(new_text, add_special_tokens=False)
        tokens = torch.tensor([new_ids], dtype=torch.long, device=self.model.cfg.device)
        used = (self.cache.seq_len if self.cache is not None else 0) + tokens.shape[1]
        budget = min(max_new_tokens, self.model.cfg.n_ctx - used)
        if budget <= 0:
            raise ValueError(
                f"the conversation ({used} tokens) fills the model's context "
                f"n_ctx={self.model.cfg.n_ctx}; reset it"
            )
        answer_ids: list[int] = []
        yield from stream_decode(tokenizer, self._answer_ids(tokens, budget, answer_ids))
        answer = tokenizer.decode(answer_ids, skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": answer})
        self._text = prompt + tokenizer.decode(answer_ids, skip_special_tokens=False)

    def _answer_ids(self, tokens: torch.Tensor, budget: int, out: list[int]) -> Iterator[int]:
        """Prefill the turn's new tokens, then yield answer ids until EOS, appending to ``out``.

        Every answer token is fed to the model, so the cache ends holding the whole answer.
        """
        eos = self.model.tokenizer.eos_token_id
        logits, self.cache = run_prompt(
            self.model, tokens, None, self.cache, tokens.shape[1] + budget
        )
        self.tokens_prefilled += tokens.shape[1]
        self.tokens.extend(tokens[0].tolist())
        for _ in range(budget):
            token = sample_logits(logits, self.sampling, None, self.generator)
            if int(token[0]) == eos:
                return
            out.append(int(token[0]))
            yield out[-1]
            logits = decode_step(self.model, token, self.cache)
            self.tokens.append(out[-1])

    def _before(self) -> _Before:
        cache = self.cache
        return _Before(
            n_messages=len(self.messages),
            cache=cache,
            seq_len=cache.seq_len if cache is not None else 0,
            tokens=self.tokens,
            n_tokens=len(self.tokens),
            tokens_prefilled=self.tokens_prefilled,
            rng_state=self.generator.get_state() if self.generator is not None else None,
        )

    def _roll_back(self, before: _Before) -> None:
        """Undo an unfinished turn: history, cache, token record, counters and sampling state."""
        del self.messages[before.n_messages :]
        if before.cache is not None:  # a failed forward pass left it whole (every layer even)
            before.cache.crop(before.seq_len)
        self.cache = before.cache  # a turn that started a new cache drops it
        del before.tokens[before.n_tokens :]
        self.tokens = before.tokens
        self.tokens_prefilled = before.tokens_prefilled
        if self.generator is not None and before.rng_state is not None:
            self.generator.set_state(before.rng_state)

    def ask(self, message: str, max_new_tokens: int = 256) -> str:
        """:meth:`send`, returning the whole answer."""
        return "".join(self.send(message, max_new_tokens))

    def history(self) -> list[dict[str, Any]]:
        """The messages so far (of the turns kept)."""
        return list(self.messages)
