"""Generation: prefill once, then one decode step per token through the key-value cache.

The loop is small free functions (``prefill``, ``decode_step``, ``generate_tokens``); the
model's ``generate`` and ``generate_stream`` methods (``GenerationMixin``) turn text into tokens
and back around them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from kvlens.cache import KeyValueCache, SharedPrefixCache
from kvlens.cache.shared import is_shareable_prefix
from kvlens.sampling import SamplingConfig, sample_logits
from kvlens.tokens import PaddingSide, pad_token_id

if TYPE_CHECKING:
    from kvlens.model import HookedTransformer

GenerateReturnType = Literal["input", "str", "tokens"]  # what generate returns


@torch.no_grad()
def last_position_logits(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None,
    cache: KeyValueCache | SharedPrefixCache | None,
) -> Float[Tensor, "batch d_vocab"]:
    """Run ``tokens`` (after what ``cache`` holds) and return the logits of the last position.

    Only the last position is unembedded: for a long prompt that skips most of the largest
    matrix product of the prefill. ``attention_mask=None`` means every token is real (no
    padding is guessed from pad tokens, unlike a forward pass with a cache).
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(tokens)
    resid = model(
        tokens,
        past_kv_cache=cache,
        attention_mask=attention_mask,
        stop_at_layer=model.cfg.n_layers,
    )
    resid = resid[:, -1:]
    if model.cfg.final_norm:
        resid = model.ln_final(resid)
    return model.unembed(resid)[:, 0]


def prefill(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    cache: KeyValueCache | None = None,
    capacity: int = 0,
) -> tuple[Float[Tensor, "batch d_vocab"], KeyValueCache]:
    """Fill a cache with ``tokens`` (a new cache unless one is given).

    ``attention_mask=None`` means every token is real.

    Returns:
        The logits of the last position and the cache.
    """
    if cache is None:
        cache = KeyValueCache.init_cache(model.cfg, model.cfg.device, tokens.shape[0], capacity)
    else:
        cache.reserve(cache.seq_len + capacity)
    return last_position_logits(model, tokens, attention_mask, cache), cache


@torch.no_grad()
def decode_step(
    model: HookedTransformer,
    token: Int[Tensor, " batch"],
    cache: KeyValueCache | SharedPrefixCache,
    real: Int[Tensor, "batch 1"] | None = None,
) -> Float[Tensor, "batch d_vocab"]:
    """Feed one token per row and return the next logits; the cache grows by one position.

    Args:
        model: The model.
        token: The new token of each row. It is real even when it is the pad token (a
            generated EOS that doubles as the pad token stays visible to later tokens).
        cache: The cache to read and extend.
        real: All ones ``[batch, 1]``, the token's mask, made once by a caller that steps many
            times (default: made here).
    """
    column = token[:, None]
    mask = real if real is not None else torch.ones_like(column)
    return model(column, past_kv_cache=cache, attention_mask=mask)[:, -1]


def left_align(
    tokens: Int[Tensor, "batch pos"], attention_mask: Int[Tensor, "batch pos"]
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Move each row's padding to its start, keeping its real tokens in order.

    Pad tokens take no position and no token attends to them, so a row means the same wherever
    its pads sit; with every pad in front, the last position of each row is its last real token,
    where its next token is read.
    """
    order = (attention_mask != 0).to(torch.int32).argsort(dim=1, stable=True)
    return tokens.gather(1, order), attention_mask.gather(1, order)


def generate_tokens(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    max_new_tokens: int,
    sampling: SamplingConfig,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    eos_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
    use_past_kv_cache: bool = True,
    past_kv_cache: KeyValueCache | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[Int[Tensor, " batch"]]:
    """Yield each step's new token of every row.

    Each row gives what it gives alone: padding may sit anywhere in ``attention_mask`` (left,
    right, or both); it is moved to the front of each row first (:func:`left_align`).
    ``attention_mask=None`` means every token is real. A row that produced an EOS (when
    ``eos_token_ids`` is not empty) yields ``pad_token_id`` from then on; generation ends when
    every row has, or after ``max_new_tokens``.
    """
    batch = tokens.shape[0]
    device = tokens.device
    if attention_mask is None:
        attention_mask = torch.ones_like(tokens)
    else:
        tokens, attention_mask = left_align(tokens, attention_mask.to(device))
    counts = None
    if sampling.freq_penalty > 0 and not sampling.greedy:
        counts = torch.zeros((batch, model.cfg.d_vocab), device=device)
        counts.scatter_add_(1, tokens, attention_mask.to(counts.dtype))
    eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    real = torch.ones((batch, 1), dtype=torch.int32, device=device)  # every new token's mask
    cache: KeyValueCache | SharedPrefixCache
    if use_past_kv_cache and is_shareable_prefix(past_kv_cache):
        # Every row continues the frozen prefix, which stays as it is; the rows' own tokens go
        # into a suffix cache after it.
        cache = SharedPrefixCache.from_prefix(
            past_kv_cache, batch, tokens.shape[1] + max_new_tokens
        )
        logits = last_position_logits(model, tokens, attention_mask, cache)
    elif use_past_kv_cache:
        logits, cache = prefill(
            model, tokens, attention_mask, past_kv_cache, tokens.shape[1] + max_new_tokens
        )
    else:
        if past_kv_cache is not None:
            raise ValueError("past_kv_cache needs use_past_kv_cache=True")
        all_tokens, all_mask = tokens, attention_mask
        logits = last_position_logits(model, all_tokens, all_mask, None)
    for step in range(max_new_tokens):
        token = sample_logits(logits, sampling, counts, generator)
        if eos.numel():
            token = torch.where(finished, torch.full_like(token, pad_token_id), token)
            finished |= torch.isin(token, eos)
        if counts is not None:
            counts.scatter_add_(
                1, token[:, None], torch.ones_like(token[:, None], dtype=counts.dtype)
            )
        yield token
        if step == max_new_tokens - 1 or (eos.numel() and bool(finished.all())):
            return
        if use_past_kv_cache:
            logits = decode_step(model, token, cache, real)
        else:
            all_tokens = torch.cat([all_tokens, token[:, None]], dim=1)
            all_mask = torch.cat([all_mask, real.to(all_mask.dtype)], dim=1)
            logits = last_position_logits(model, all_tokens, all_mask, None)


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
        """The prompt's tokens and mask, checked against the context length."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
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
        sampling = SamplingConfig(do_sample, temperature, top_k, top_p, freq_penalty)
        tokens, mask = self._generation_inputs(
            input, attention_mask, prepend_bos, padding_side, max_new_tokens, past_kv_cache
        )
        if generator is None and seed is not None:
            generator = torch.Generator(device=tokens.device).manual_seed(seed)
        state = past_kv_cache.checkpoint() if isinstance(past_kv_cache, KeyValueCache) else None
        # No inference_mode around the loop: a generator would leak it to the caller between
        # yields. The model calls inside run under no_grad.
        try:
            yield from generate_tokens(
                self,  # type: ignore[arg-type]
                tokens,
                max_new_tokens,
                sampling,
                attention_mask=mask,
                eos_token_ids=self._eos_ids(eos_token_id, stop_at_eos),
                pad_token_id=pad_token_id(self.tokenizer) if self.tokenizer is not None else 0,
                use_past_kv_cache=use_past_kv_cache,
                past_kv_cache=past_kv_cache,
                generator=generator,
            )
        except GeneratorExit:
            raise  # closed by the consumer: the steps fed so far stay
        except BaseException:
            if past_kv_cache is not None and state is not None:
                past_kv_cache.restore(state)
            raise

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
        tokens, mask = self._generation_inputs(
            input, attention_mask, prepend_bos, padding_side, max_new_tokens, past_kv_cache
        )
        # All or nothing: a call that raises (an interrupt, a hook) leaves past_kv_cache as it
        # was at the call, so that a retry equals a clean run.
        state = past_kv_cache.checkpoint() if isinstance(past_kv_cache, KeyValueCache) else None
        try:
            if num_beams > 1 or draft_model is not None:
                from kvlens.strategies import strategy_new_tokens

                new = strategy_new_tokens(
                    self,  # type: ignore[arg-type]
                    tokens,
                    mask,
                    max_new_tokens,
                    do_sample,
                    self._eos_ids(eos_token_id, stop_at_eos),
                    past_kv_cache,
                    num_beams,
                    length_penalty,
                    early_stopping,
                    draft_model,
                    num_speculative_tokens,
                    speculative_stats,
                )
            else:
                stream = self.generate_stream(
                    tokens,
                    max_new_tokens,
                    stop_at_eos,
                    eos_token_id,
                    do_sample,
                    top_k,
                    top_p,
                    temperature,
                    freq_penalty,
                    use_past_kv_cache,
                    attention_mask=mask,
                    past_kv_cache=past_kv_cache,
                    seed=seed,
                    generator=generator,
                )
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
        """Each row's prompt (padding dropped) and new tokens (up to its EOS) as text."""
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
            texts.append(tokenizer.decode(ids, clean_up_tokenization_spaces=False))
        return texts
