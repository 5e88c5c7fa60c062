"""The model's ``generate`` and ``generate_stream`` (``GenerationMixin``), TransformerLens's API.

They turn text into tokens and TransformerLens's keyword arguments into one
:class:`~kvlens.generation_config.GenerationConfig`, then run the decode loop
(:mod:`kvlens.decode`) or a strategy (:mod:`kvlens.strategies`), and turn tokens back into text.
The loop's functions are re-exported here (``from kvlens.generate import run_prompt``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from kvlens.cache import KeyValueCache
from kvlens.decode import (
    Step,
    alignment_order,
    decode_step,
    generate_tokens,
    generation_steps,
    last_position_logits,
    left_align,
    run_prompt,
)
from kvlens.generation_config import GenerationConfig
from kvlens.generation_output import GenerateOutput, GenerateReturnType, generation_result
from kvlens.generation_record import GenerationRecorder
from kvlens.hooks import NameFilter
from kvlens.sampling import SamplingConfig
from kvlens.strategies import strategy_new_tokens
from kvlens.tokens import PaddingSide, pad_token_id

__all__ = [
    "GenerateOutput",
    "GenerateReturnType",
    "GenerationConfig",
    "GenerationMixin",
    "Step",
    "decode_step",
    "generate_tokens",
    "generation_steps",
    "last_position_logits",
    "left_align",
    "run_prompt",
]


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
        """The prompt's tokens (or token embeddings) and mask, checked against the context
        length.

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
        elif isinstance(input, Tensor) and input.is_floating_point():
            tokens = input  # token embeddings
            if input.ndim != 3 or input.shape[2] != self.cfg.d_model:
                raise ValueError(
                    f"input embeddings must be [batch, pos, d_model={self.cfg.d_model}], got "
                    f"{tuple(input.shape)}"
                )
            mask = attention_mask
            if mask is None:
                mask = torch.ones(input.shape[:2], dtype=torch.long, device=input.device)
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
    ) -> Iterator[Step]:
        """The decode loop's steps; if a step raises, ``past_kv_cache`` goes back to its state at
        the first step (closing the stream early keeps what was fed)."""
        if generator is None and seed is not None:
            generator = torch.Generator(device=tokens.device).manual_seed(seed)
        state = past_kv_cache.checkpoint() if isinstance(past_kv_cache, KeyValueCache) else None
        # No inference_mode around the loop: a generator would leak it to the caller between
        # yields. The model calls inside run under no_grad.
        try:
            yield from generation_steps(
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
        for step in self._stream(tokens, mask, options, past_kv_cache, seed, generator):
            yield step.token

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
        output_logits: bool = False,
        return_cache: bool = False,
        names_filter: NameFilter = None,
        cache_device: torch.device | str | None = None,
    ) -> Any:
        """Continue the input, reusing past keys and values (TransformerLens's ``generate``).

        Each row of a batch gets exactly the tokens it gets alone, whichever side it is padded
        on: the next token is read at each row's last real token.

        Args:
            input: A prompt, a list of prompts (padded into one batch on ``padding_side``),
                tokens ``[batch, pos]``, or token embeddings ``[batch, pos, d_model]`` (float)
                in place of ``embed(tokens)`` (they pass ``hook_embed`` and get positions as
                embedded tokens would).
            max_new_tokens: Tokens to add at most.
            stop_at_eos: Stop a row at its first EOS; later positions hold the pad token.
            eos_token_id: The EOS id (or ids); default the tokenizer's.
            do_sample: Sample; ``False`` is greedy.
            top_k, top_p, temperature, freq_penalty: See :class:`kvlens.sampling.SamplingConfig`
                (with embeddings as input, the frequency penalty counts the new tokens only).
            use_past_kv_cache: Reuse keys and values; ``False`` reruns the whole sequence each step
                (slow; for checking).
            prepend_bos: Prepend BOS to text input; default ``cfg.default_prepend_bos``. For
                token input without a mask: whether a leading pad that is BOS is real.
            padding_side: Padding of a batch of prompts, default left; for token input without
                a mask, the end its rows are padded at, default the tokenizer's.
            return_type: ``"str"``, ``"tokens"``, ``"embeds"`` (the token embeddings of the
                input and the new tokens, ``[batch, pos + new, d_model]``), or ``"input"`` (the
                input's kind). For embeddings as input, ``"tokens"`` and ``"str"`` hold only
                the new tokens (as TransformerLens).
            verbose: Show a progress bar.
            attention_mask: The mask of token or embedding input (1 = real token). Default: the
                pad tokens at the padded end of each row are padding, as a forward pass with a
                cache guesses (see :meth:`HookedTransformer.forward`); every token is real when
                the model has no tokenizer, or for embeddings.
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
            output_logits: Return a :class:`GenerateOutput`: the tokens and each step's logits
                (as TransformerLens's ``output_logits``; ``return_type`` is then not read).
            return_cache: Also return an :class:`~kvlens.activation_cache.ActivationCache` of
                the prompt's and the new tokens' activations, collected by the generation's
                own passes (see :mod:`kvlens.generation_record`): equal to ``run_with_cache``
                on the returned tokens with the mask ``attention_mask`` followed by ones (the
                tokens after a row's EOS count as real, as generation fed them). After a
                ``past_kv_cache``, positions start at its length (the attention maps' key axis
                still starts at 0). The last new token is run through the model too, one pass
                more than without the cache (so a ``past_kv_cache`` then holds it as well).
            names_filter: The hook points ``return_cache`` records (a name, a list, a predicate;
                default all). Recording only ``hook_resid_pre``/``hook_resid_post`` keeps the
                fused native decode layer; a hook point inside a block runs that block op by op.
            cache_device: Where ``return_cache`` keeps the activations (default: where computed).

        Returns:
            The input followed by the new tokens: tokens ``[batch, pos + new]`` (the prompt as
            given, padding included), strings (one string for one prompt) without padding, or
            embeddings. With ``output_logits``, a :class:`GenerateOutput`; with
            ``return_cache``, a pair ``(that, cache)``.
        """
        if return_type not in ("input", "str", "tokens", "embeds"):
            raise ValueError(
                f"return_type must be 'input', 'str', 'tokens' or 'embeds', got {return_type!r}"
            )
        if not return_cache and (names_filter is not None or cache_device is not None):
            raise ValueError(
                "names_filter and cache_device are return_cache's: pass return_cache=True"
            )
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
            feed_last_token=return_cache,
        )
        if output_logits and options.strategy is not None:
            raise ValueError(f"output_logits is not available with {options.strategy}")
        prompt, mask = self._generation_inputs(
            input, attention_mask, prepend_bos, padding_side, max_new_tokens, past_kv_cache
        )
        if options.strategy is not None and prompt.is_floating_point():
            raise ValueError(f"{options.strategy} takes tokens, not embeddings")
        recorder = None
        if return_cache:  # before any work: an unknown name in names_filter raises here
            recorder = GenerationRecorder(self, names_filter, cache_device)  # type: ignore[arg-type]
        hooks = self.hooks  # type: ignore[attr-defined]
        hooked = hooks(recorder.fwd_hooks) if recorder else contextlib.nullcontext()
        # All or nothing: a call that raises (an interrupt, a hook) leaves past_kv_cache as it
        # was at the call, so that a retry equals a clean run.
        state = past_kv_cache.checkpoint() if isinstance(past_kv_cache, KeyValueCache) else None
        try:
            with hooked:
                new, logits = self._new_tokens(
                    prompt, mask, options, past_kv_cache, seed, generator, verbose
                )
        except BaseException:
            if past_kv_cache is not None and state is not None:
                past_kv_cache.restore(state)
            raise
        if output_logits:
            result: Any = GenerateOutput(
                new if prompt.is_floating_point() else torch.cat([prompt, new], 1), logits
            )
        else:
            result = generation_result(self, input, prompt, mask, new, return_type)  # type: ignore[arg-type]
        if recorder is None:
            return result
        order = alignment_order(mask)
        identity = torch.arange(mask.shape[1], device=order.device).expand_as(order)
        return result, recorder.cache(None if torch.equal(order, identity) else order)

    def _new_tokens(
        self,
        prompt: Tensor,
        mask: Tensor,
        options: GenerationConfig,
        past_kv_cache: KeyValueCache | None,
        seed: int | None,
        generator: torch.Generator | None,
        verbose: bool,
    ) -> tuple[Int[Tensor, "batch new"], tuple[Tensor, ...]]:
        """The new tokens of every row, and each step's logits (none from a strategy)."""
        if options.strategy is not None:
            new = strategy_new_tokens(
                self,  # type: ignore[arg-type]
                prompt,
                mask,
                options,
                past_kv_cache,
            )
            return new, ()
        stream = self._stream(prompt, mask, options, past_kv_cache, seed, generator)
        total = options.max_new_tokens
        steps = list(tqdm(stream, total=total, disable=not verbose, desc="generate"))
        if not steps:
            return torch.zeros((prompt.shape[0], 0), dtype=torch.long, device=prompt.device), ()
        return torch.stack([s.token for s in steps], dim=1), tuple(s.logits for s in steps)
