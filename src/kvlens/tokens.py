"""Text to tokens and back: ``to_tokens``, ``to_string``, ``to_str_tokens`` and the like."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal, cast

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from kvlens.config import ModelConfig

PaddingSide = Literal["left", "right"]


def encode_batch(
    tokenizer: Any,
    texts: Sequence[str],
    prepend_bos: bool,
    padding_side: PaddingSide,
    n_ctx: int | None = None,
    truncate: bool = True,
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Tokenize texts into one padded batch.

    Special-token text (``"<|im_start|>"``) becomes its special token. BOS is added by this
    function (when ``prepend_bos``), never by the tokenizer, so the choice is explicit.

    Returns:
        ``(tokens, attention_mask)``; the mask is 1 on real tokens, 0 on padding.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    rows: list[list[int]] = []
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"input must be str or a list of str, got an item of {type(text)}")
        ids = list(tokenizer.encode(text, add_special_tokens=False))
        if prepend_bos:
            if tokenizer.bos_token_id is None:
                raise ValueError("prepend_bos=True but the tokenizer has no BOS token")
            ids = [tokenizer.bos_token_id, *ids]
        if truncate and n_ctx is not None:
            ids = ids[:n_ctx]
        rows.append(ids)
    width = max(len(r) for r in rows)
    pad_id = pad_token_id(tokenizer)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        n = len(ids)
        sl = slice(width - n, width) if padding_side == "left" else slice(0, n)
        tokens[i, sl] = torch.tensor(ids, dtype=torch.long)
        mask[i, sl] = 1
    return tokens, mask


def pad_token_id(tokenizer: Any) -> int:
    """The id used for padding: the pad token, else EOS, else 0."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def padding_mask_from_tokens(
    tokens: Int[Tensor, "batch pos"],
    pad_id: int,
    padding_side: PaddingSide,
    keep_last_leading_pad: bool = False,
) -> Bool[Tensor, "batch pos"]:
    """Which tokens are real, judged from the tokens alone (TransformerLens 2.18's rule).

    Only a run of ``pad_id`` at the padded end of a row counts as padding: the leading run for
    left padding, the trailing run for right padding. A pad id anywhere else is a real token;
    one at the padded end is taken for padding even when it was meant (e.g. a leading EOS when
    the pad token is EOS), exactly as TransformerLens takes it.

    Args:
        tokens: Token ids.
        pad_id: The pad token's id.
        padding_side: The end the rows are padded at.
        keep_last_leading_pad: The BOS token is the pad token and was prepended (left padding
            only): the last leading pad of each row is its BOS, and stays real.

    Returns:
        True on real tokens, False on padding.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    real = tokens != pad_id
    if tokens.shape[-1] > 1:
        # A token is real if a non-pad token sits at or before it (left) / at or after it (right).
        if padding_side == "left":
            real = real.cumsum(-1) > 0
        else:
            real = real.flip(-1).cumsum(-1).flip(-1) > 0
    if keep_last_leading_pad and padding_side == "left":
        # The token before a real one (the last token of an all-pad row) is the BOS.
        after = torch.ones_like(real[..., :1])
        real = real | torch.cat((real[..., 1:], after), dim=-1)
    return real


class TokenizerMixin:
    """Tokenizer helpers with TransformerLens's names, for models with ``cfg`` and ``tokenizer``."""

    cfg: ModelConfig
    tokenizer: Any

    def set_tokenizer(self, tokenizer: Any, default_padding_side: PaddingSide = "right") -> None:
        """Attach a tokenizer and set its padding side, as TransformerLens's ``set_tokenizer``.

        The tokenizer object itself is changed (``tokenizer.padding_side``), so that
        ``model.tokenizer.padding_side = "left"`` later changes how this model pads, as in
        TransformerLens.

        Args:
            tokenizer: A Hugging Face tokenizer, or ``None``.
            default_padding_side: Where ``to_tokens`` pads a batch unless told otherwise;
                TransformerLens's default, ``"right"``, whatever side the checkpoint chose.
        """
        if default_padding_side not in ("left", "right"):
            raise ValueError(
                f"default_padding_side must be 'left' or 'right', got {default_padding_side!r}"
            )
        if tokenizer is not None:
            tokenizer.padding_side = default_padding_side
        self.tokenizer = tokenizer

    def _inferred_attention_mask(
        self,
        tokens: Int[Tensor, "batch pos"],
        has_cache: bool,
        prepend_bos: bool | None,
        padding_side: PaddingSide | None,
    ) -> Bool[Tensor, "batch pos"] | None:
        """The mask TransformerLens 2.18 gives token input passed without one, or ``None``.

        TransformerLens infers one when the padding side is left or when a cache is passed, and
        then treats the pad tokens at the padded end as padding (see
        :func:`padding_mask_from_tokens`). The padding side is ``padding_side`` when given (as
        TransformerLens's forward sets it on its tokenizer for the call), else the tokenizer's.
        Without a tokenizer nothing is inferred (TransformerLens raises when it would infer):
        ``None`` means every token is real.
        """
        tokenizer = self.tokenizer
        if tokenizer is None:
            return None
        side = padding_side or getattr(tokenizer, "padding_side", None) or "right"
        if side != "left" and not has_cache:
            return None
        pad = pad_token_id(tokenizer)
        prepend = self.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
        bos = getattr(tokenizer, "bos_token_id", None)
        keep_bos = bool(prepend) and side == "left" and bos is not None and int(bos) == pad
        if keep_bos and tokens.shape[-1] == 1:
            return None  # a lone token is the row's BOS, or follows it: real either way
        return padding_mask_from_tokens(tokens, pad, side, keep_bos)

    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise ValueError(
                "this model has no tokenizer; pass tokens, or load it with from_pretrained / "
                "from_hf_model(..., tokenizer=...)"
            )
        return self.tokenizer

    def to_tokens_and_mask(
        self,
        input: str | Sequence[str],
        prepend_bos: bool | None = None,
        padding_side: PaddingSide | None = None,
        truncate: bool = True,
    ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
        """Tokens and attention mask of one string or a batch of strings."""
        tokenizer = self._require_tokenizer()
        texts = [input] if isinstance(input, str) else list(input)
        if not texts:
            raise ValueError("input is an empty list; give at least one string")
        tokens, mask = encode_batch(
            tokenizer,
            texts,
            self.cfg.default_prepend_bos if prepend_bos is None else prepend_bos,
            padding_side or getattr(tokenizer, "padding_side", "right") or "right",
            self.cfg.n_ctx,
            truncate,
        )
        device = self.cfg.device
        return tokens.to(device), mask.to(device)

    def to_tokens(
        self,
        input: str | Sequence[str],
        prepend_bos: bool | None = None,
        padding_side: PaddingSide | None = None,
        move_to_device: bool = True,
        truncate: bool = True,
    ) -> Int[Tensor, "batch pos"]:
        """Token ids ``[batch, pos]`` of a string or a list of strings (padded).

        Args:
            input: Text or texts.
            prepend_bos: Prepend BOS; default ``cfg.default_prepend_bos``.
            padding_side: Where padding goes in a batch; default the tokenizer's (right).
            move_to_device: Move the tokens to ``cfg.device``.
            truncate: Cut to ``cfg.n_ctx`` tokens.
        """
        tokens, _ = self.to_tokens_and_mask(input, prepend_bos, padding_side, truncate)
        return tokens if move_to_device else tokens.cpu()

    def to_string(self, tokens: Tensor | Sequence[int] | int) -> str | list[str]:
        """Decode token ids: a 1-D sequence gives a string, a 2-D batch a list of strings."""
        tokenizer = self._require_tokenizer()
        if isinstance(tokens, int):
            tokens = [tokens]
        t = torch.as_tensor(tokens)
        if t.ndim == 0:
            t = t[None]
        if t.ndim == 1:
            return tokenizer.decode(t.tolist(), clean_up_tokenization_spaces=False)
        if t.ndim == 2:
            return [tokenizer.decode(r, clean_up_tokenization_spaces=False) for r in t.tolist()]
        raise ValueError(f"tokens must be 1-D or 2-D, got shape {tuple(t.shape)}")

    def to_str_tokens(
        self,
        input: str | Tensor | np.ndarray | Sequence[Any],
        prepend_bos: bool | None = None,
        padding_side: PaddingSide | None = None,
    ) -> list[str] | list[list[str]]:
        """Each token as its own string, as TransformerLens's ``to_str_tokens``.

        A string is tokenized first (``prepend_bos``, ``padding_side`` as in :meth:`to_tokens`).
        A tensor or array is squeezed and must then be 1-D (so ``[1, pos]`` works). A list of
        strings, tensors or arrays gives one list per item. A flat list of ints is read as one
        sequence of ids, where TransformerLens raises.
        """
        tokenizer = self._require_tokenizer()
        if isinstance(input, str):
            ids = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)[0]
            return _decode_each(tokenizer, ids.tolist())
        if isinstance(input, (list, tuple)):
            if input and all(isinstance(i, int) for i in input):
                return _decode_each(tokenizer, list(input))
            return [
                cast(list[str], self.to_str_tokens(item, prepend_bos, padding_side))
                for item in input
            ]
        if isinstance(input, (Tensor, np.ndarray)):
            t = torch.as_tensor(input).squeeze()
            if t.ndim == 0:
                t = t[None]
            if t.ndim != 1:
                raise ValueError(
                    "to_str_tokens takes one sequence of tokens; got shape "
                    f"{tuple(torch.as_tensor(input).shape)}"
                )
            return _decode_each(tokenizer, t.tolist())
        raise ValueError(f"to_str_tokens cannot read input of type {type(input).__name__}")

    def to_single_token(self, string: str) -> int:
        """The id of the one token ``string`` is (no BOS).

        Raises:
            ValueError: If ``string`` is more than one token.
        """
        tokens = self.to_tokens(string, prepend_bos=False).squeeze()
        if tokens.ndim != 0:
            raise ValueError(f"{string!r} is {tokens.numel()} tokens, not a single token")
        return int(tokens.item())

    def to_single_str_token(self, int_token: int) -> str:
        """The text of token id ``int_token``."""
        if not isinstance(int_token, int):
            raise TypeError(f"int_token must be an int, got {type(int_token).__name__}")
        return _decode_each(self._require_tokenizer(), [int_token])[0]

    def get_token_position(
        self,
        single_token: str | int | Tensor,
        input: str | Int[Tensor, " pos"] | Int[Tensor, "1 pos"],
        mode: Literal["first", "last"] = "first",
        prepend_bos: bool | None = None,
        padding_side: PaddingSide | None = None,
    ) -> int:
        """Where ``single_token`` first (or last) occurs in ``input``.

        Args:
            single_token: A token, as its text (one token) or id.
            input: Text (tokenized with ``prepend_bos`` and ``padding_side``, so positions
                count the BOS when one is added) or tokens ``[pos]`` / ``[1, pos]``.
            mode: ``"first"`` or ``"last"`` occurrence.

        Raises:
            ValueError: If the token does not occur, the tokens are a batch of more than one,
                or ``mode`` is neither.
        """
        if isinstance(input, str):
            tokens = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)
        else:
            tokens = input
        if tokens.ndim == 2:
            if tokens.shape[0] != 1:
                raise ValueError(f"tokens of rank 2 must be [1, pos], got {tuple(tokens.shape)}")
            tokens = tokens[0]
        if isinstance(single_token, str):
            single_token = self.to_single_token(single_token)
        elif isinstance(single_token, Tensor):
            single_token = int(single_token.item())
        found = (tokens == single_token).nonzero().flatten()
        if found.numel() == 0:
            raise ValueError(f"token {single_token} does not occur in the input")
        if mode == "first":
            return int(found[0].item())
        if mode == "last":
            return int(found[-1].item())
        raise ValueError(f"mode must be 'first' or 'last', got {mode!r}")

    def tokens_to_residual_directions(
        self, tokens: str | int | Int[Tensor, "..."]
    ) -> Float[Tensor, "*tokens d_model"]:
        """The unembedding direction (column of ``W_U``) of each token: ``[..., d_model]``.

        A string (one token), an int or a one-element tensor gives ``[d_model]``; a tensor of
        more tokens gives its own shape plus ``d_model``.
        """
        W_U = getattr(self, "W_U", None)
        if W_U is None:
            raise ValueError("tokens_to_residual_directions needs the model's W_U")
        if isinstance(tokens, Tensor) and tokens.numel() > 1:
            return W_U[:, tokens].movedim(0, -1)
        if isinstance(tokens, str):
            token = self.to_single_token(tokens)
        elif isinstance(tokens, int):
            token = tokens
        elif isinstance(tokens, Tensor) and tokens.numel() == 1:
            token = int(tokens.item())
        else:
            raise ValueError(f"cannot read tokens of type {type(tokens).__name__}")
        return W_U[:, token]


def _decode_each(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each id decoded on its own, with no clean-up of spaces."""
    return [tokenizer.decode([i], clean_up_tokenization_spaces=False) for i in ids]


def stream_decode(
    tokenizer: Any, ids: Iterable[int], skip_special_tokens: bool = True
) -> Iterator[str]:
    """Turn a stream of token ids into a stream of text pieces.

    A piece is yielded once the text decodes cleanly, so a character split over several byte
    tokens (emoji, CJK) comes out whole.
    """
    seen: list[int] = []
    shown = ""
    for token_id in ids:
        seen.append(int(token_id))
        text = tokenizer.decode(seen, skip_special_tokens=skip_special_tokens)
        if text.endswith("\ufffd") or not text.startswith(shown):
            continue
        if len(text) > len(shown):
            yield text[len(shown) :]
            shown = text
    text = tokenizer.decode(seen, skip_special_tokens=skip_special_tokens)
    if text != shown:
        yield text[len(shown) :] if text.startswith(shown) else text
