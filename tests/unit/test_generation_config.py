"""``GenerationConfig`` (``kvlens/generation_config.py``): checked once, and no import cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from kvlens.generation_config import GenerationConfig
from kvlens.sampling import SamplingConfig

GREEDY = SamplingConfig(do_sample=False)
SRC = Path(__file__).parents[2] / "src" / "kvlens"
GENERATION = (
    "generation_config",
    "sampling",
    "decode",
    "beam",
    "speculative",
    "strategies",
    "generate",
    "chat",
)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"max_new_tokens": -1}, "max_new_tokens must be an int >= 0"),
        ({"max_new_tokens": 2.0}, "max_new_tokens must be an int >= 0"),
        ({"num_beams": 2, "draft_model": object(), "sampling": GREEDY}, "not both"),
        ({"num_beams": 2}, "beam search is greedy here: pass do_sample=False"),
        ({"draft_model": object()}, "speculative decoding is greedy here"),
    ],
)
def test_bad_options_raise_naming_them(fields, words):
    with pytest.raises(ValueError, match=words):
        GenerationConfig(**fields)


def test_strategy_names_the_decoding_strategy():
    assert GenerationConfig().strategy is None
    assert GenerationConfig(num_beams=3, sampling=GREEDY).strategy == "beam search"
    draft = GenerationConfig(draft_model=object(), sampling=GREEDY)  # type: ignore[arg-type]
    assert draft.strategy == "speculative decoding"


def _kvlens_imports(module: str) -> set[str]:
    """The generation modules ``module`` imports at run time, at any depth (a function's
    import too), leaving out ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse((SRC / f"{module}.py").read_text())
    type_only = {
        id(sub)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
        for sub in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and id(node) not in type_only and node.module:
            name = node.module.removeprefix("kvlens.")
            if name in GENERATION:
                found.add(name)
    return found


def test_the_generation_modules_import_each_other_without_a_cycle():
    graph = {module: _kvlens_imports(module) for module in GENERATION}
    assert "strategies" not in graph["decode"] and "generate" not in graph["decode"]
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join((*path, module))}"
        if module not in done:
            for dep in graph[module]:
                visit(dep, (*path, module))
            done.add(module)

    for module in GENERATION:
        visit(module, ())


@pytest.mark.parametrize("module", GENERATION)
def test_each_generation_module_imports_alone(module):
    run = subprocess.run(
        [sys.executable, "-c", f"import kvlens.{module}"], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
