"""TransformerLens 2.18 as the oracle: fixtures giving the same weights to both libraries.

The suite needs the ``compat`` extra (``pip install -e '.[compat]'``); without TransformerLens it
is skipped and the rest of the test suite runs as before.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Iterator

import pytest
from tests.compat.pairs import FAMILIES, Pair, model_pair, text_pair

# Nothing may be downloaded: if TL ever tried to fetch a tokenizer or config, fail at once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _why_skipped() -> str | None:
    """Why the suite cannot run here, or ``None``.

    Only a missing TransformerLens skips the suite; one that is installed but fails to import
    (a missing or too new dependency of its own) is an error worth seeing.
    """
    try:
        import transformer_lens  # noqa: F401
    except ModuleNotFoundError as error:
        if error.name != "transformer_lens":
            raise
        return "TransformerLens is not installed (pip install -e '.[compat]')"
    version = importlib.metadata.version("transformer-lens")
    if not version.startswith("2.18."):
        # The differences the suite pins are TL 2.18's; another version needs a review first.
        return f"the suite targets TransformerLens 2.18, found {version}"
    return None


SKIP_REASON = _why_skipped()
if SKIP_REASON is not None:
    # A conftest cannot skip itself (pytest.importorskip here is a collection error), so the
    # test modules are left out and the reason goes in the report header.
    collect_ignore_glob = ["test_*.py"]


def pytest_report_header() -> str | None:
    return f"tests/compat skipped: {SKIP_REASON}" if SKIP_REASON else None


def _clean(pair: Pair) -> None:
    for model in (pair.kv, pair.tl):
        model.reset_hooks(including_permanent=True)
        model.zero_grad(set_to_none=True)


@pytest.fixture(params=FAMILIES)
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    """The tokenizer-less pair of each family; hooks and gradients are cleared afterwards."""
    built = model_pair(request.param)
    _clean(built)
    yield built
    _clean(built)


@pytest.fixture(params=FAMILIES)
def tpair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    """The pair of each family with the tiny tokenizer, padding on the right (TL's default)."""
    built = text_pair(request.param)
    _clean(built)
    yield built
    _clean(built)


@pytest.fixture(params=FAMILIES)
def left_pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    """The pair of each family with the tiny tokenizer, both padding on the left."""
    built = text_pair(request.param, "left")
    _clean(built)
    yield built
    _clean(built)
