"""The physical floor of a decode step: the bytes it must read and the arithmetic it must do.

A decode step reads every weight matrix once (the embedding only one row per sequence, the
unembedding ``W_U`` whole) and the cached keys and values up to the current length, and does
two FLOPs per weight per sequence plus the attention's. Its floor on this machine is the larger
of ``bytes / measured read bandwidth`` and ``FLOPs / measured matmul rate``; no implementation
in fp32 can beat it. Both rates are measured in the same run as the systems.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from model_shapes import n_kv_heads

FP32 = 4


def measure_read_bandwidth(gib: float = 1.0, repeats: int = 9) -> float:
    """Bytes per second read by ``sum`` over a ``gib``-GiB fp32 tensor (median of ``repeats``)."""
    x = torch.ones(int(gib * 2**30) // FP32)
    x.sum()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return x.numel() * FP32 / statistics.median(times)


def measure_matmul_rate(n: int = 2048, repeats: int = 9) -> float:
    """FLOPs per second of an fp32 ``n x n`` matmul (median of ``repeats``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


def measure_machine() -> dict[str, float]:
    """Both rates, as stored in the results: ``read_gb_s`` and ``matmul_gflop_s``."""
    return {
        "read_gb_s": measure_read_bandwidth() / 1e9,
        "matmul_gflop_s": measure_matmul_rate() / 1e9,
    }


def block_matmul_params(shape: dict[str, Any]) -> int:
    """Weights of the projection matrices of all blocks (attention and MLP)."""
    d_model, d_head, d_mlp = shape["d_model"], shape["d_head"], shape["d_mlp"]
    q_and_o = 2 * d_model * shape["n_heads"] * d_head
    k_and_v = 2 * d_model * n_kv_heads(shape) * d_head
    mlp = (3 if shape["gated_mlp"] else 2) * d_model * d_mlp
    return shape["n_layers"] * (q_and_o + k_and_v + mlp)


def vector_params(shape: dict[str, Any]) -> int:
    """Norm weights and biases read by a step (all blocks and the final norm)."""
    d_model, d_mlp = shape["d_model"], shape["d_mlp"]
    norm = 2 * d_model if shape["normalization_type"] == "LN" else d_model
    per_layer = 2 * norm
    if shape["attn_qkv_bias"]:
        per_layer += (shape["n_heads"] + 2 * n_kv_heads(shape)) * shape["d_head"]
    if shape["attn_out_bias"]:
        per_layer += d_model
    if shape["mlp_bias"]:
        per_layer += (2 if shape["gated_mlp"] else 1) * d_mlp + d_model
    return shape["n_layers"] * per_layer + (norm if shape["final_norm"] else 0)


def unembed_params(shape: dict[str, Any]) -> int:
    return shape["d_model"] * shape["d_vocab"]


def kv_bytes(shape: dict[str, Any], batch: int, context: int) -> int:
    """Bytes of cached keys and values for ``context`` positions of ``batch`` sequences."""
    per_position = shape["n_layers"] * 2 * n_kv_heads(shape) * shape["d_head"] * FP32
    return batch * context * per_position


def decode_step_bytes(shape: dict[str, Any], batch: int, context: int) -> int:
    """Bytes one decode step reads with ``context`` positions already cached."""
    weights = block_matmul_params(shape) + vector_params(shape) + unembed_params(shape)
    embed_rows = 2 if shape["positional_embedding_type"] == "standard" else 1
    embeddings = batch * embed_rows * shape["d_model"]
    return FP32 * (weights + embeddings) + kv_bytes(shape, batch, context)


def attention_flops(shape: dict[str, Any], batch: int, queries: int, keys: int) -> int:
    """Scores and weighted sum of ``queries`` positions over ``keys`` positions, all layers."""
    return 4 * batch * shape["n_heads"] * shape["d_head"] * queries * keys * shape["n_layers"]


def decode_step_flops(shape: dict[str, Any], batch: int, context: int) -> int:
    """FLOPs of one decode step with ``context`` positions already cached."""
    matmul = 2 * batch * (block_matmul_params(shape) + unembed_params(shape))
    return matmul + attention_flops(shape, batch, 1, context)


def prefill_flops(shape: dict[str, Any], batch: int, prompt: int) -> int:
    """FLOPs of a prefill that unembeds only the last position, with causal attention."""
    matmul = 2 * batch * (prompt * block_matmul_params(shape) + unembed_params(shape))
    # Position i attends to i + 1 positions: prompt * (prompt + 1) / 2 pairs in all.
    return matmul + attention_flops(shape, batch, 1, prompt * (prompt + 1) // 2)


def decode_floor(
    shape: dict[str, Any], batch: int, context: int, machine: dict[str, float]
) -> dict[str, float]:
    """The floor of one decode step at ``context``: its bytes, FLOPs and milliseconds."""
    nbytes = decode_step_bytes(shape, batch, context)
    flops = decode_step_flops(shape, batch, context)
    read_ms = 1e3 * nbytes / (machine["read_gb_s"] * 1e9)
    compute_ms = 1e3 * flops / (machine["matmul_gflop_s"] * 1e9)
    return {
        "context": context,
        "bytes": nbytes,
        "flops": flops,
        "read_ms": read_ms,
        "compute_ms": compute_ms,
        "floor_ms": max(read_ms, compute_ms),
    }


def prefill_floor_ms(
    shape: dict[str, Any], batch: int, prompt: int, machine: dict[str, float]
) -> float:
    """Milliseconds of a prefill at the measured matmul rate (its reads are far cheaper)."""
    return 1e3 * prefill_flops(shape, batch, prompt) / (machine["matmul_gflop_s"] * 1e9)
