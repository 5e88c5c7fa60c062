"""QuantizedMatrix: ggml blocks kept as stored, products on few rows and on many."""

from __future__ import annotations

import pytest
import torch

from kvlens.quantized import TILE_FLOATS, QuantizedMatrix, block_bytes


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q8_0"])
def test_products_on_few_and_many_rows_equal_the_dequantized_matrix(fmt: str) -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(300, 96, generator=gen)
    matrix = QuantizedMatrix.quantize(weight, fmt)
    assert matrix.shape == (300, 96) and matrix.nbytes == 300 * 3 * block_bytes(fmt)
    exact = matrix.dequantize()
    assert (exact - weight).abs().max() < (0.6 if fmt != "q8_0" else 0.05)  # what rounding costs
    bias = torch.randn(300, generator=gen)
    for rows in (1, 7, 100):  # 100 rows: dequantized tile by tile
        x = torch.randn(rows, 96, generator=gen)
        want = x.double() @ exact.double().T + bias.double()
        assert torch.allclose(matrix.matmul(x, bias).double(), want, atol=1e-4, rtol=1e-5)


def test_many_rows_never_hold_the_whole_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    import kvlens.quantized as module

    monkeypatch.setattr(module, "TILE_FLOATS", 64 * 40)  # 40 output rows a tile
    matrix = QuantizedMatrix.quantize(torch.randn(100, 64), "q8_0")
    seen = []
    dequantize = matrix.dequantize

    def spy(start: int = 0, stop: int | None = None) -> torch.Tensor:
        out = dequantize(start, stop)
        seen.append(out.shape[0])
        return out

    monkeypatch.setattr(matrix, "dequantize", spy)
    x = torch.randn(50, 64)
    out = matrix.matmul(x)
    assert seen == [40, 40, 20]
    assert torch.allclose(out, x @ dequantize().T, atol=1e-5)
    assert TILE_FLOATS * 4 <= 8 << 20


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="fmt must be one of"):
        QuantizedMatrix(torch.zeros(2, 34, dtype=torch.uint8), 32, "q5_0")
    with pytest.raises(ValueError, match="multiple of 32"):
        QuantizedMatrix(torch.zeros(2, 34, dtype=torch.uint8), 40, "q8_0")
    with pytest.raises(ValueError, match=r"uint8 \[d_out, 68\]"):
        QuantizedMatrix(torch.zeros(2, 34, dtype=torch.uint8), 64, "q8_0")
    matrix = QuantizedMatrix.quantize(torch.randn(4, 64), "q4_1")
    with pytest.raises(ValueError, match="d_in=64"):
        matrix.matmul(torch.randn(1, 63))
