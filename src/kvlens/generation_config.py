"""The options of one generation, as one frozen object built once per call.

``generate`` and ``generate_stream`` keep TransformerLens's keyword arguments; they turn them into
a :class:`GenerationConfig` before any work, and the loop (:mod:`kvlens.decode`) and the
strategies (:mod:`kvlens.strategies`) read that instead of long argument lists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from kvlens.sampling import SamplingConfig

if TYPE_CHECKING:
    from kvlens.model import HookedTransformer
    from kvlens.speculative import SpeculativeStats

EarlyStopping = bool | Literal["never"]  # beam search's stopping rule, as in Hugging Face
Strategy = Literal["beam search", "speculative decoding"]


@dataclass(frozen=True)
class GenerationConfig:
    """How ``generate`` continues a prompt.

    Attributes:
        max_new_tokens: Tokens to add at most (>= 0).
        sampling: How each next token is chosen.
        eos_token_ids: A row stops at its first of these (none: every row runs to the end).
        pad_token_id: What a stopped row yields from then on.
        use_past_kv_cache: Reuse keys and values; ``False`` reruns the whole sequence each step.
        num_beams: Above 1, beam search (see :mod:`kvlens.beam`).
        length_penalty, early_stopping: Beam search's, as in Hugging Face.
        draft_model: Speculative decoding with this draft model (see :mod:`kvlens.speculative`).
        num_speculative_tokens: Tokens the draft proposes per round.
        stats: A :class:`kvlens.speculative.SpeculativeStats` that speculative decoding fills in.
        feed_last_token: Run the last new token through the model too (its logits unused), so
            that hooks see every position of the result (``generate(return_cache=True)``).
    """

    max_new_tokens: int = 10
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    use_past_kv_cache: bool = True
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: EarlyStopping = False
    draft_model: HookedTransformer | None = field(default=None, compare=False)
    num_speculative_tokens: int = 4
    stats: SpeculativeStats | None = field(default=None, compare=False)
    feed_last_token: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {self.max_new_tokens!r}")
        if self.num_beams > 1 and self.draft_model is not None:
            raise ValueError("give num_beams > 1 or draft_model, not both")
        if self.strategy is not None and self.feed_last_token:
            raise ValueError(f"{self.strategy} cannot return a cache of activations")
        if self.strategy is not None and self.sampling.do_sample:
            raise ValueError(f"{self.strategy} is greedy here: pass do_sample=False")

    @property
    def strategy(self) -> Strategy | None:
        """The decoding strategy besides sampling, if any."""
        if self.num_beams > 1:
            return "beam search"
        if self.draft_model is not None:
            return "speculative decoding"
        return None
