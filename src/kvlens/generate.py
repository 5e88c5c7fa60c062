"""The model's ``generate`` and ``generate_stream`` (``GenerationMixin``), TransformerLens's API.

They turn text into tokens and TransformerLens's keyword arguments into one
:class:`~kvlens.generation_config.GenerationConfig`, then run the decode loop
(:mod:`kvlens.decode`) or a strategy (:mod:`kvlens.strategies`), and turn tokens back into text.
The loop's functions are re-exported here (``from kvlens.generate import run_prompt``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from kvlens.cache import KeyValueCache
from kvlens.decode import decode_step, generate_tokens, last_position_logits, left_align, run_prompt
from kvlens.generation_config import GenerationConfig
from kvlens.sampling import SamplingConfig
from kvlens.strategies import strategy_new_tokens
from kvlens.tokens import PaddingSide, pad_token_id

__all__ = [
    "GenerateReturnType",
    "GenerationConfig",
    "GenerationMixin",
    "decode_step",
    "generate_tokens",
    "last_position_logits",
    "left_align",
    "run_prompt",
]

GenerateReturnType = Literal["input", "str", "tokens"]  # what generate returns


class GenerationMixin:
    """``generate`` and ``generate_stream`` with TransformerLens's arguments."""

    cfg: Any
    tokenizer: Any

    def _generation_inputs(
        self,
        input: str | Sequence[str] | Tensor,
        attention_mask: Tensor | None,
        prepend_bos: bool | None,
        padding_side: PaddingSide | None,
        max_new_tokens: int,
        past_kv_cache: KeyValueCache | None,
    ) -> tuple[Tensor, Tensor]:
        """The prompt's tokens and mask, checked against the context length.

        ``max_new_tokens`` comes from a :class:`GenerationConfig`, which has checked it.
        """
        if isinstance(input, str) or (
            isinstance(input, Sequence) and not isinstance(input, Tensor)
        ):
            texts = [input] if isinstance(input, str) else list(input)
            if not texts or any(not t for t in texts):
                raise ValueError("input is empty: give a non-empty prompt")
            tokens, mask = self.to_tokens_and_mask(  # type: ignore[attr-defined]
                texts, prepend_bos=prepend_bos, padding_side=padding_side or "left", truncate=False
            )
            if attention_mask is not None:
                raise ValueError("attention_mask is only accepted with token input")
        elif isinstance(input, Tensor):
            tokens = input[None] if input.ndim == 1 else input
            if tokens.ndim != 2 or tokens.dtype not in (torch.int32, torch.int64):
                raise ValueError(
                    "input tokens must be an integer tensor [batch, pos], got "
                    f"{tuple(input.shape)} of {input.dtype}"
                )
            mask = attention_mask
            if mask is None:
                # Always as with a cache (generation reads one), so that use_past_kv_cache=False
                # gives the same tokens.
                inferred = self._inferred_attention_mask(  # type: ignore[attr-defined]
                    tokens, True, prepend_bos, padding_side
                )
                mask = torch.ones_like(tokens) if inferred is None else inferred.to(tokens.dtype)
        else:
            raise TypeError(
                f"input must be a string, a list of strings or a token tensor, got {type(input)}"
            )
        if tokens.shape[1] == 0:
            raise ValueError("input is empty: give at least one token")
        before = past_kv_cache.seq_len if past_kv_cache is not None else 0
        total = before + tokens.shape[1] + max_new_tokens
        if total > self.cfg.n_ctx:
            raise ValueError(
                f"the prompt ({before + tokens.shape[1]} tokens) plus max_new_tokens "
                f"({max_new_tokens}) is {total} tokens, over the model's context n_ctx="
                f"{self.cfg.n_ctx}"
            )
        return tokens, mask

    def _eos_ids(self, eos_token_id: int | Sequence[int] | None, stop_at_eos: bool) -> list[int]:
        if not stop_at_eos:
            return []
        if eos_token_id is None:
            eos_token_id = getattr(self.tokenizer, "eos_token_id", None)
            if eos_token_id is None:
                raise ValueError("stop_at_eos=True needs eos_token_id (the model has no tokenizer)")
        return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)

    def _generation_options(
        self, stop_at_eos: bool, eos_token_id: int | Sequence[int] | None, **fields: Any
    ) -> GenerationConfig:
        """TransformerLens's arguments (and kvlens's) as one checked :class:`GenerationConfig`:
        the EOS and pad ids from the tokenizer, the rest (``fields``) as given."""
        return GenerationConfig(
            eos_token_ids=tuple(self._eos_ids(eos_token_id, stop_at_eos)),
            pad_token_id=pad_token_id(self.tokenizer) if self.tokenizer is not None else 0,
            **fields,
        )

    def _stream(
        self,
        tokens: Tensor,
        mask: Tensor,
        options: GenerationConfig,
        past_kv_cache: KeyValueCache | None,
        seed: int | None,
        generator: torch.Generator | None,
    ) -> Iterator[Int[Tensor, " batch"]]:
        """The decode loop's tokens; if a step raises, ``past_kv_cache`` goes back to its state at
        the first step (closing the stream early keeps what was fed)."""
        if generator is None and seed is not None:
            generator = torch.Generator(device=tokens.device).manual_seed(seed)
        state = past_kv_cache.checkpoint() if isinstance(past_kv_cache, KeyValueCache) else None
        # No inference_mode around the loop: a generator would leak it to the caller between
        # yields. The model calls inside run under no_grad.
        try:
            yield from generate_tokens(
                self,  # type: ignore[arg-type]
                tokens,
                mask,
                options,
                past_kv_cache,
                generator,
            )
        except GeneratorExit:
            raise  # closed by the consumer: the steps fed so far stay
        except BaseException:
            if past_kv_cache is not None and state is not None:
                past_kv_cache.restore(state)
            raise

    def generate_stream(
        self,
        input: str | Sequence[str] | Tensor = "",
        max_new_tokens: int = 10,
        stop_at_eos: bool = True,
        eos_token_id: int | Sequence[int] | None = None,
        do_sample: bool = True,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float = 1.0,
        freq_penalty: float = 0.0,
        use_past_kv_cache: bool = True,
        prepend_bos: bool | None = None,
        padding_side: PaddingSide | None = None,
        attention_mask: Tensor | None = None,
        past_kv_cache: KeyValueCache | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[Int[Tensor, " batch"]]:
        """Yield the new token of every row, step by step (arguments as in :meth:`generate`).

        If a step raises (an interrupt, a hook), ``past_kv_cache`` goes back to its state at the
        first step. Closing the stream early keeps what was fed (``past_kv_cache.tokens`` says
        what that is): the last token yielded is not in the cache yet.
        """
        options = self._generation_options(
            stop_at_eos,
            eos_token_id,
            max_new_tokens=max_new_tokens,
            sampling=SamplingConfig(do_sample, temperature, top_k, top_p, freq_penalty),
            use_past_kv_cache=use_past_kv_cache,
        )
        tokens, mask = self._generation_inputs(
            input, attention_mask, prepend_bos, padding_side, max_new_tokens, past_kv_cache
        )
        yield from self._stream(tokens, mask, options, past_kv_cache, seed, generator)

    def generate(
        self,
        input: str | Sequence[str] | Tensor = "",
        max_new_tokens: int = 10,
        stop_at_eos: bool = True,
        eos_token_id: int | Sequence[int] | None = None,
        do_sample: bool = True,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float = 1.0,
        freq_penalty: float = 0.0,
        use_past_kv_cache: bool = True,
        prepend_bos: bool | None = None,
        padding_side: PaddingSide | None = None,
        return_type: GenerateReturnType = "input",
        verbose: bool = True,
        attention_mask: Tensor | None = None,
        past_kv_cache: KeyValueCache | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        early_stopping: bool | Literal["never"] = False,
        draft_model: Any = None,
        num_speculative_tokens: int = 4,
        speculative_stats: Any = None,
    ) -> Any:
        """Continue the input, reusing past keys and values (TransformerLens's ``generate``).

        Each row of a batch gets exactly the tokens it gets alone, whichever side it is padded
        on: the next token is read at each row's last real token.

        Args:
            input: A prompt, a list of prompts (padded into one batch on ``padding_side``), or
                tokens ``[batch, pos]``.
            max_new_tokens: Tokens to add at most.
            stop_at_eos: Stop a row at its first EOS; later positions hold the pad token.
            eos_token_id: The EOS id (or ids); default the tokenizer's.
            do_sample: Sample; ``False`` is greedy.
            top_k, top_p, temperature, freq_penalty: See :class:`kvlens.sampling.SamplingConfig`.
            use_past_kv_cache: Reuse keys and values; ``False`` reruns the whole sequence each step
                (slow; for checking).
            prepend_bos: Prepend BOS to text input; default ``cfg.default_prepend_bos``. For
                token input without a mask: whether a leading pad that is BOS is real.
            padding_side: Padding of a batch of prompts, default left; for token input without
                a mask, the end its rows are padded at, default the tokenizer's.
            return_type: ``"str"``, ``"tokens"``, or ``"input"`` (the input's kind).
            verbose: Show a progress bar.
            attention_mask: The mask of token input (1 = real token). Default: the pad tokens
                at the padded end of each row are padding, as a forward pass with a cache
                guesses (see :meth:`HookedTransformer.forward`); every token is real when the
                model has no tokenizer.
            past_kv_cache: Continue after what this cache holds (it is extended).
            seed: Seed of a private random generator, for reproducible sampling.
            generator: A random generator to sample with (instead of ``seed``).
            num_beams: Above 1, beam search (one prompt, ``do_sample=False``; see
                :mod:`kvlens.beam`) returning the best hypothesis.
            length_penalty, early_stopping: Beam search's, as in Hugging Face.
            draft_model: Speculative decoding with this draft model (one prompt,
                ``do_sample=False``; see :mod:`kvlens.speculative`): the same tokens as greedy.
            num_speculative_tokens: Tokens the draft proposes per round.
            speculative_stats: A :class:`kvlens.speculative.SpeculativeStats` to fill in
                (acceptance rate and so on).

        Returns:
            The input followed by the new tokens: tokens ``[batch, pos + new]`` (the prompt as
            given, padding included), or strings (one string for one prompt), without padding.
        """
        if return_type not in ("input", "str", "tokens"):
            raise ValueError(f"return_type must be 'input', 'str' or 'tokens', got {return_type!r}")
        options = self._generation_options(
            stop_at_eos,
            eos_token_id,
            max_new_tokens=max_new_tokens,
            sampling=SamplingConfig(do_sample, temperature, top_k, top_p, freq_penalty),
            use_past_kv_cache=use_past_kv_cache,
            num_beams=num_beams,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
            draft_model=draft_model,
            num_speculative_tokens=num_speculative_tokens,
            stats=speculative_stats,
        )
        tokens, mask = self._generation_inputs(
            input, attention_mask, prepend_bos, padding_side, max_new_tokens, past_kv_cache
        )
        # All or nothing: a call that raises (an interrupt, a hook) leaves past_kv_cache as it
        # was at the call, so that a retry equals a clean run.
        state = past_kv_cache.checkpoint() if isinstance(past_kv_cache, KeyValueCache) else None
        try:
            if options.strategy is not None:
                new = strategy_new_tokens(
                    self,  # type: ignore[arg-type]
                    tokens,
                    mask,
                    options,
                    past_kv_cache,
                )
            else:
                stream = self._stream(tokens, mask, options, past_kv_cache, seed, generator)
                progress = tqdm(stream, total=max_new_tokens, disable=not verbose, desc="generate")
                steps = list(progress)
                new = torch.stack(steps, dim=1) if steps else tokens[:, :0]
        except BaseException:
            if past_kv_cache is not None and state is not None:
                past_kv_cache.restore(state)
            raise
        out = torch.cat([tokens, new], dim=1)
        if return_type == "input":
            return_type = "str" if isinstance(input, (str, list, tuple)) else "tokens"
        if return_type == "tokens":
            return out
        texts = self._decode_rows(tokens, mask, new)
        return texts[0] if isinstance(input, str) else texts

    def _decode_rows(self, tokens: Tensor, mask: Tensor, new: Tensor) -> list[str]:
        """Each row's prompt (padding dropped) and new tokens (up to its EOS) as text.

        Special tokens (BOS, EOS, chat markers) are left out of the text, as TransformerLens's
        ``generate`` decodes; ``return_type="tokens"`` keeps every id.
        """
        tokenizer = self.tokenizer
        if tokenizer is None:
            raise ValueError("return_type='str' needs a tokenizer")
        eos = self._eos_ids(None, getattr(tokenizer, "eos_token_id", None) is not None)
        texts = []
        rows = zip(tokens.tolist(), mask.tolist(), new.tolist(), strict=True)
        for row, row_mask, row_new in rows:
            ids = [t for t, m in zip(row, row_mask, strict=True) if m]
            for t in row_new:
                ids.append(t)
                if t in eos:
                    break
            texts.append(
                tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            )
        return texts
