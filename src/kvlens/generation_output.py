"""What ``generate`` returns: tokens, text, embeddings, or tokens with each step's logits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

if TYPE_CHECKING:
    from kvlens.model import HookedTransformer

GenerateReturnType = Literal["input", "str", "tokens", "embeds"]  # what generate returns


@dataclass(frozen=True)
class GenerateOutput:
    """What ``generate(..., output_logits=True)`` returns (as TransformerLens's, or Hugging
    Face's ``GenerateDecoderOnlyOutput``).

    Attributes:
        sequences: The tokens: the prompt's then the new ones ``[batch, pos + new]`` (only the
            new ones for input given as embeddings).
        logits: Each step's logits ``[batch, d_vocab]``, those its token was chosen from
            (before temperature, top-k or top-p), one tensor per new token.
    """

    sequences: Int[Tensor, "batch pos"]
    logits: tuple[Float[Tensor, "batch d_vocab"], ...]


def generation_result(
    model: HookedTransformer,
    input: Any,
    prompt: Int[Tensor, "batch pos"] | Float[Tensor, "batch pos d_model"],
    mask: Int[Tensor, "batch pos"],
    new: Int[Tensor, "batch new"],
    return_type: GenerateReturnType,
) -> Any:
    """``generate``'s result for these new tokens, as ``return_type`` asks.

    ``"input"`` is the input's kind: text for text, tokens for tokens, embeddings for
    embeddings. For embeddings as input, ``"tokens"`` and ``"str"`` hold the new tokens only
    (as in TransformerLens: there are no prompt tokens).
    """
    from_embeds = prompt.is_floating_point()
    if return_type == "input":
        if isinstance(input, (str, list, tuple)):
            return_type = "str"
        else:
            return_type = "embeds" if from_embeds else "tokens"
    if return_type == "tokens":
        return new if from_embeds else torch.cat([prompt, new], dim=1)
    if return_type == "embeds":
        with torch.no_grad():
            if from_embeds:
                return torch.cat([prompt, model.embed(new).to(prompt.dtype)], dim=1)
            return model.embed(torch.cat([prompt, new], dim=1))
    if from_embeds:
        prompt, mask = new[:, :0], mask[:, :0]
    texts = decode_rows(model.tokenizer, prompt, mask, new)
    return texts[0] if isinstance(input, str) else texts


def decode_rows(
    tokenizer: Any,
    tokens: Int[Tensor, "batch pos"],
    mask: Int[Tensor, "batch pos"],
    new: Int[Tensor, "batch new"],
) -> list[str]:
    """Each row's prompt (padding dropped) and new tokens (up to its EOS) as text.

    Special tokens (BOS, EOS, chat markers) are left out of the text, as TransformerLens's
    ``generate`` decodes; ``return_type="tokens"`` keeps every id.
    """
    if tokenizer is None:
        raise ValueError("return_type='str' needs a tokenizer")
    eos_id = getattr(tokenizer, "eos_token_id", None)
    texts = []
    rows = zip(tokens.tolist(), mask.tolist(), new.tolist(), strict=True)
    for row, row_mask, row_new in rows:
        ids = [t for t, m in zip(row, row_mask, strict=True) if m]
        for t in row_new:
            ids.append(t)
            if t == eos_id:
                break
        texts.append(
            tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        )
    return texts
