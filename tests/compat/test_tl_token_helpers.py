"""Token helpers (``to_single_token``, ``get_token_position``, ``to_str_tokens``...) equal TL's."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from tests.compat.pairs import Pair, assert_same

TEXT = "the cat sat on the red tree"


def test_to_single_token(tpair: Pair) -> None:
    for word in ("the", "cat", "because"):
        got = tpair.kv.to_single_token(word)
        assert isinstance(got, int)
        assert got == tpair.tl.to_single_token(word)


def test_to_single_token_of_more_tokens(tpair: Pair) -> None:
    with pytest.raises(AssertionError):
        tpair.tl.to_single_token("the cat")
    with pytest.raises(ValueError, match="not a single token"):
        tpair.kv.to_single_token("the cat")


def test_to_single_str_token(tpair: Pair) -> None:
    for token in (1, 4, 20, 30):
        assert tpair.kv.to_single_str_token(token) == tpair.tl.to_single_str_token(token)
    with pytest.raises(TypeError):
        tpair.kv.to_single_str_token(torch.tensor(4))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"mode": "last"},
        {"prepend_bos": False},
        {"mode": "last", "prepend_bos": False, "padding_side": "left"},
        {"padding_side": "left"},
    ],
)
def test_get_token_position_in_text(tpair: Pair, kwargs: dict[str, Any]) -> None:
    for token in ("the", "cat", tpair.tl.to_single_token("tree")):
        got = tpair.kv.get_token_position(token, TEXT, **kwargs)
        assert isinstance(got, int)
        assert got == tpair.tl.get_token_position(token, TEXT, **kwargs)


def test_get_token_position_in_tokens(tpair: Pair) -> None:
    tokens = tpair.tl.to_tokens(TEXT)
    the = tpair.tl.to_single_token("the")
    for single in ("the", the, torch.tensor(the)):
        for mode in ("first", "last"):
            for given in (tokens, tokens[0]):
                want = tpair.tl.get_token_position(single, given, mode=mode)
                assert tpair.kv.get_token_position(single, given, mode=mode) == want


def test_get_token_position_errors(tpair: Pair) -> None:
    with pytest.raises(ValueError, match="does not occur"):
        tpair.kv.get_token_position("dog", TEXT)
    with pytest.raises(ValueError, match="mode"):
        tpair.kv.get_token_position("cat", TEXT, mode="middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\[1, pos\]"):
        tpair.kv.get_token_position("cat", tpair.kv.to_tokens([TEXT, TEXT]))


def _inputs(tpair: Pair) -> list[Any]:
    tokens = tpair.tl.to_tokens(TEXT)
    return [
        TEXT,
        [TEXT, "a dog ran"],
        tokens,
        tokens[0],
        tokens[0, 2],
        tokens[:, :1],
        tokens.numpy(),
        tokens[0].numpy(),
        [tokens[0], tokens[0, :3]],
        [tokens[0].numpy()],
    ]


def test_to_str_tokens(tpair: Pair) -> None:
    for given in _inputs(tpair):
        assert tpair.kv.to_str_tokens(given) == tpair.tl.to_str_tokens(given), repr(given)


@pytest.mark.parametrize(
    "kwargs", [{"prepend_bos": False}, {"prepend_bos": True, "padding_side": "left"}]
)
def test_to_str_tokens_of_text(tpair: Pair, kwargs: dict[str, Any]) -> None:
    for given in (TEXT, [TEXT, "a dog"]):
        assert tpair.kv.to_str_tokens(given, **kwargs) == tpair.tl.to_str_tokens(given, **kwargs)


def test_to_str_tokens_of_a_list_of_ids(tpair: Pair) -> None:
    """Pinned difference: TL raises on a flat list of ints; kvlens reads it as one sequence."""
    ids = tpair.tl.to_tokens(TEXT)[0].tolist()
    with pytest.raises(ValueError):
        tpair.tl.to_str_tokens(ids)
    assert tpair.kv.to_str_tokens(ids) == tpair.tl.to_str_tokens(torch.tensor(ids))


def test_to_str_tokens_of_a_batch(tpair: Pair) -> None:
    tokens = tpair.tl.to_tokens([TEXT, TEXT])
    with pytest.raises(AssertionError):
        tpair.tl.to_str_tokens(tokens)
    with pytest.raises(ValueError, match="one sequence"):
        tpair.kv.to_str_tokens(tokens)
    with pytest.raises(ValueError):
        tpair.kv.to_str_tokens(3.5)  # type: ignore[arg-type]


def test_tokens_to_residual_directions(tpair: Pair) -> None:
    tokens = tpair.tl.to_tokens(TEXT)
    for given in ("cat", 7, torch.tensor(9), torch.tensor([9]), tokens[0], tokens, tokens[0, :2]):
        got = tpair.kv.tokens_to_residual_directions(given)
        want = tpair.tl.tokens_to_residual_directions(given)
        assert_same(got, want, repr(given))
    with pytest.raises(ValueError):
        tpair.kv.tokens_to_residual_directions(np.array([1, 2]))  # type: ignore[arg-type]
