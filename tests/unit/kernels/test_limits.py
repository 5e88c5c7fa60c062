"""The kernels' limits and struct layout come from the C library, and a disagreement refuses it.

A Python copy of a C limit or struct that drifted would be a silent memory overwrite, so Python
reads the limits from the library (limits.c) and checks its ctypes mirror of ``kvlens_layer``
against the library's own sizes and offsets; a library that disagrees is not used.
"""

from __future__ import annotations

import ctypes
import logging
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tests.helpers import make_hf_model

from kvlens import HookedTransformer, KeyValueCache, kernels
from kvlens.kernels import build, layer


def native(q, k, v, mask=None, threads=None):  # type: ignore[no-untyped-def]
    """The kernel with the default rule's scale, ``1 / sqrt(d_head)``."""
    return kernels.decode_attention(q, k, v, mask, threads, scale=q.shape[-1] ** -0.5)


def native_lse(q, k, v, mask=None, threads=None):  # type: ignore[no-untyped-def]
    return kernels.decode_attention_lse(q, k, v, mask, threads, scale=q.shape[-1] ** -0.5)


pytestmark = pytest.mark.skipif(not build.available(), reason="native kernels not built here")


def defines() -> dict[str, int]:
    """The ``KVLENS_*`` integer limits kernels.h defines."""
    text = (Path(build.__file__).parent / "kernels.h").read_text()
    found = re.findall(r"#define KVLENS_(\w+) \(?(\d+)(?: \* (\d+))?\)?", text)
    return {name.lower(): int(a) * int(b or 1) for name, a, b in found}


def test_python_uses_the_limits_the_library_reports() -> None:
    lib = build.library()
    assert lib is not None
    reported = build.Limits(
        lib.kvlens_max_rows(),
        lib.kvlens_single_thread_bytes(),
        lib.kvlens_attention_max_group(),
        lib.kvlens_attention_max_d_head(),
    )
    assert kernels.limits() == build.read_limits(lib) == reported
    assert reported._asdict() == {name: defines()[name] for name in build.Limits._fields}


def test_the_ops_take_up_to_the_library_limits_and_no_more() -> None:
    limits = kernels.limits()
    assert limits is not None
    w = torch.randn(8, 4)
    assert kernels.matmul(torch.randn(limits.max_rows, 8), w) is not None
    assert kernels.matmul(torch.randn(limits.max_rows + 1, 8), w) is None
    group, d_head = limits.attention_max_group, limits.attention_max_d_head
    k = torch.randn(1, 1, 5, d_head)
    assert native(torch.randn(1, group, 1, d_head), k, k) is not None
    assert native(torch.randn(1, group + 1, 1, d_head), k, k) is None
    wide = torch.randn(1, 1, 5, d_head + 1)
    assert native(torch.randn(1, 1, 1, d_head + 1), wide, wide) is None


def test_the_layout_mirror_agrees_with_the_library() -> None:
    lib = build.library()
    assert lib is not None
    assert layer.layout_problem(lib) is None
    assert ctypes.sizeof(layer._Layer) == lib.kvlens_layer_size()


def reporting(name: str, value: Callable[[int], int]) -> Callable[..., ctypes.CDLL]:
    """A ``ctypes.CDLL`` whose libraries report ``value(true value)`` from function ``name``."""
    real_cdll = ctypes.CDLL

    def load(*args, **kwargs):  # type: ignore[no-untyped-def]
        lib = real_cdll(*args, **kwargs)
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int64
        true = fn()
        setattr(lib, name, lambda: value(true))
        return lib

    return load


def test_the_ops_follow_a_limit_the_library_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build.ctypes, "CDLL", reporting("kvlens_max_rows", lambda _: 2))
    lib = build.load()
    assert lib is not None and build.read_limits(lib).max_rows == 2
    monkeypatch.setitem(build._state, "lib", lib)
    w = torch.randn(8, 4)
    assert kernels.matmul(torch.randn(2, 8), w) is not None
    assert kernels.matmul(torch.randn(3, 8), w) is None
    assert kernels.rms_norm(torch.randn(3, 8), None, 1e-5) is None


class _Double(ctypes.Structure):
    """The mirror with ``eps`` as a double: every later field moves."""

    _fields_ = [(n, ctypes.c_double if n == "eps" else t) for n, t in layer._Layer._fields_]


class _Short(ctypes.Structure):
    """The mirror without its last field."""

    _fields_ = layer._Layer._fields_[:-1]


class _Swapped(ctypes.Structure):
    """The mirror with two fields of one type in the other order."""

    _fields_ = [
        ({"n_heads": "n_kv", "n_kv": "n_heads"}.get(n, n), t) for n, t in layer._Layer._fields_
    ]


@pytest.fixture
def decode_logits() -> Callable[[], torch.Tensor]:
    """Prefill and decode steps of a tiny Llama; its native result is checked against torch."""
    model = HookedTransformer.from_hf_model(make_hf_model("llama"))
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 5), generator=torch.Generator().manual_seed(0))
    steps = torch.randint(0, model.cfg.d_vocab, (2, 3), generator=torch.Generator().manual_seed(1))

    def run() -> torch.Tensor:
        cache = KeyValueCache.init_cache(model.cfg, None, 2, 16)
        with torch.no_grad():
            model(tokens, past_kv_cache=cache)
            return torch.stack([model(steps[:, i : i + 1], past_kv_cache=cache) for i in range(3)])

    return run


@pytest.mark.parametrize(
    ("mirror", "named"),
    [
        (_Double, "kvlens_layer.eps is 4 bytes at offset 104 in the library, 8 bytes"),
        (_Short, "kvlens_layer's fields ['work'] are only in the library"),
        (_Swapped, "kvlens_layer.n_heads is 8 bytes at offset 16 in the library, 8 bytes at "),
        (None, "kvlens_layer has"),  # the library reports another size
    ],
)
def test_a_library_that_disagrees_is_refused_and_torch_runs(
    mirror: type[ctypes.Structure] | None,
    named: str,
    decode_logits: Callable[[], torch.Tensor],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    native = decode_logits()
    if mirror is None:
        monkeypatch.setattr(build.ctypes, "CDLL", reporting("kvlens_layer_size", lambda n: n + 8))
    else:
        monkeypatch.setattr(layer, "_Layer", mirror)
    monkeypatch.setattr(build, "_state", {})  # load again, with the disagreement
    with caplog.at_level(logging.WARNING, logger="kvlens.kernels"):
        assert not kernels.available()
    assert "not using the native kernels" in caplog.text and named in caplog.text
    assert kernels.limits() is None
    assert kernels.matmul(torch.randn(1, 8), torch.randn(8, 4)) is None
    torch.testing.assert_close(decode_logits(), native, rtol=1e-5, atol=1e-5)


def test_the_activation_codes_agree_with_the_library() -> None:
    lib = build.library()
    assert lib is not None
    assert build.activation_problem(lib) is None
    assert lib.kvlens_activation_name(kernels.ACTIVATIONS["silu"]) == b"silu"


def test_a_library_whose_activation_codes_differ_is_refused(
    decode_logits: Callable[[], torch.Tensor],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    native = decode_logits()
    swapped = dict(kernels.ACTIVATIONS, relu=kernels.ACTIVATIONS["silu"])
    monkeypatch.setattr(kernels, "ACTIVATIONS", swapped)
    monkeypatch.setattr(build, "_state", {})  # load again, with the disagreement
    with caplog.at_level(logging.WARNING, logger="kvlens.kernels"):
        assert not kernels.available()
    assert "'silu' in the library, 'relu' (relu)" in caplog.text
    torch.testing.assert_close(decode_logits(), native, rtol=1e-5, atol=1e-5)
