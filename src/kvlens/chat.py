"""Multi-turn chat that keeps the conversation in the key-value cache.

Each turn prefills only its own new tokens: the text the chat template adds after what the cache
already holds (the end of the last answer, the new user message, the assistant header). The
answers the model produced stay in the cache as the tokens it produced.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from kvlens.cache import KeyValueCache
from kvlens.generate import decode_step, prefill
from kvlens.sampling import SamplingConfig, sample_logits
from kvlens.tokens import stream_decode

if TYPE_CHECKING:
    from kvlens.model import HookedTransformer


class ChatSession:
    """A conversation with a model whose history lives in a :class:`KeyValueCache`.

    Args:
        model: A model with a tokenizer that has a chat template.
        system_prompt: Optional system message.
        sampling: How tokens are chosen (default greedy).
        seed: Seed for sampling.
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
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (and empty the cache)."""
        self.messages: list[dict[str, str]] = []
        if self.system_prompt:
            self.messages.append({"role": "system", "content": self.system_prompt})
        self.cache: KeyValueCache | None = None
        self._text = ""  # the text the cache holds (rendered prompt plus generated answers)
        self.tokens_prefilled = 0  # prompt tokens run through the model so far, all turns
        self.tokens: list[int] = []  # every token the cache holds, in order

    def _render(self, add_generation_prompt: bool) -> str:
        return str(
            self.model.tokenizer.apply_chat_template(
                self.messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        )

    def send(self, message: str, max_new_tokens: int = 256) -> Iterator[str]:
        """Add a user message and stream the answer as text pieces.

        The answer is added to the history when the stream is exhausted.
        """
        if not message:
            raise ValueError("message is empty")
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
            self.messages.pop()
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
        logits, self.cache = prefill(self.model, tokens, None, self.cache, tokens.shape[1] + budget)
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

    def ask(self, message: str, max_new_tokens: int = 256) -> str:
        """:meth:`send`, returning the whole answer."""
        return "".join(self.send(message, max_new_tokens))

    def history(self) -> list[dict[str, Any]]:
        """The messages so far."""
        return list(self.messages)
