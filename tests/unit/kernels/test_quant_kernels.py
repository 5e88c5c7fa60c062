"""Products and dequantization on ggml's blocks (``quant.c``) against gguf's reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize, quantize

from kvlens.kernels import build, limits
from kvlens.kernels.quantized import QUANT_TYPES, block_bytes, qdequantize, qmatmul
from kvlens.loading.gguf import default_gguf_path
from kvlens.quantized import QuantizedMatrix
from kvlens.quantized import block_bytes as format_bytes

pytestmark = pytest.mark.skipif(not build.available(), reason="native kernels not built here")
FORMATS = sorted(QUANT_TYPES)


def blocks_of(weight: np.ndarray, fmt: str) -> tuple[torch.Tensor, np.ndarray]:
    """``weight`` quantized by gguf's reference, and gguf's dequantization of it."""
    qtype = GGMLQuantizationType[fmt.upper()]
    blocks = quantize(weight, qtype)
    exact = dequantize(blocks, qtype).reshape(weight.shape).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(blocks)), exact


@pytest.mark.parametrize("fmt", FORMATS)
def test_block_sizes_agree_with_gguf(fmt: str) -> None:
    assert block_bytes(QUANT_TYPES[fmt]) == format_bytes(fmt)
    assert block_bytes(1) is None  # F16: not a block format of the kernels


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_is_exact(fmt: str) -> None:
    weight = np.random.default_rng(0).standard_normal((70, 256)).astype(np.float32)
    weight[3] = 0.0  # a zero scale
    weight[4, :32] = 1e-6  # subnormal fp16 scales
    blocks, exact = blocks_of(weight, fmt)
    out = qdequantize(blocks, QUANT_TYPES[fmt], 256)
    assert out is not None and torch.equal(out, torch.from_numpy(exact))
    part = qdequantize(blocks, QUANT_TYPES[fmt], 256, 5, 9)
    assert part is not None and torch.equal(part, torch.from_numpy(exact[5:9]))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows", [1, 3, 32])
def test_products_equal_the_dequantized_product(fmt: str, rows: int) -> None:
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((200, 512)).astype(np.float32)
    blocks, exact = blocks_of(weight, fmt)
    x = torch.from_numpy(rng.standard_normal((rows, 512)).astype(np.float32))
    bias = torch.from_numpy(rng.standard_normal(200).astype(np.float32))
    out = qmatmul(x, blocks, QUANT_TYPES[fmt], bias)
    want = x.double() @ torch.from_numpy(exact).double().T + bias.double()
    assert out is not None and out.shape == (rows, 200)
    assert torch.allclose(out.double(), want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_row_is_bitwise_the_same_alone_in_a_batch_and_on_any_thread_count(fmt: str) -> None:
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((1000, 576)).astype(np.float32)  # over 256 KB of blocks
    blocks, _ = blocks_of(weight, fmt)
    x = torch.from_numpy(rng.standard_normal((8, 576)).astype(np.float32))
    qtype = QUANT_TYPES[fmt]
    one = qmatmul(x, blocks, qtype, threads=1)
    assert one is not None
    for threads in (2, 3):
        assert torch.equal(qmatmul(x, blocks, qtype, threads=threads), one)
    alone = qmatmul(x[5:6], blocks, qtype, threads=2)
    assert alone is not None and torch.equal(alone[0], one[5])
    strided = qmatmul(torch.cat([x, x], dim=1)[:, :576], blocks, qtype)  # rows 1152 apart
    assert strided is not None and torch.equal(strided, one)


def test_what_the_kernels_do_not_take_goes_back_to_the_caller() -> None:
    weight = np.random.default_rng(3).standard_normal((64, 64)).astype(np.float32)
    blocks, _ = blocks_of(weight, "q8_0")
    lim = limits()
    assert lim is not None
    x = torch.randn(lim.max_rows + 1, 64)
    assert qmatmul(x, blocks, 8) is None  # too many rows: a prefill's tiles
    assert qmatmul(torch.randn(1, 64).double(), blocks, 8) is None
    assert qmatmul(torch.randn(1, 64, requires_grad=True), blocks, 8) is None
    assert qmatmul(torch.randn(1, 64), blocks, 3) is None  # Q4_1 rows are 40 bytes, not 68
    assert qmatmul(torch.randn(1, 64), blocks[:, :34], 8) is None  # not contiguous
    assert qdequantize(blocks, 8, 96) is None
    with pytest.raises(ValueError, match=r"rows 10\.\.70"):
        qdequantize(blocks, 8, 64, 10, 70)


def test_the_default_models_blocks() -> None:
    """Its Q4_1 projections and Q8_0 embedding dequantize as gguf's reference does."""
    reader = GGUFReader(default_gguf_path())
    tensors = {t.name: t for t in reader.tensors}
    for name, fmt in [("blk.0.ffn_down.weight", "q4_1"), ("token_embd.weight", "q8_0")]:
        tensor = tensors[name]
        rows = np.asarray(tensor.data[:300])
        d_in = int(tensor.shape[0])
        exact = dequantize(rows, tensor.tensor_type).reshape(300, d_in)
        matrix = QuantizedMatrix(torch.from_numpy(np.array(rows)), d_in, fmt)
        assert torch.equal(matrix.dequantize(), torch.from_numpy(exact.astype(np.float32)))
        x = torch.randn(2, d_in, generator=torch.Generator().manual_seed(0))
        want = x.double() @ torch.from_numpy(exact).double().T
        assert torch.allclose(matrix.matmul(x).double(), want, atol=1e-4, rtol=1e-5)


def test_dequantized_q4_0_keeps_the_sign_of_zero() -> None:
    """(q - 8) * d as ggml computes it: -0.0 where q = 8 and d < 0."""
    weight = np.full((1, 32), -1.0, dtype=np.float32)
    weight[0, 0] = -8.0  # d = 1.0, every other weight q = 7
    weight[0, 1:] = 8.0 * np.linspace(-1, 0, 31, dtype=np.float32)  # some codes are 8
    weight *= -1.0  # a negative scale
    blocks, exact = blocks_of(weight, "q4_0")
    out = qdequantize(blocks, QUANT_TYPES["q4_0"], 32)
    assert out is not None
    assert torch.equal(out.view(torch.int32), torch.from_numpy(exact).view(torch.int32))
    assert bool(torch.signbit(out[out == 0]).any())
