"""A model's weight matrices as ggml blocks: installing them, making them, undoing them.

``HookedTransformer`` inherits :class:`QuantizationMixin`. The matrices that can be held as blocks
are each block's attention projections (``W_QKV``, ``W_O_flat``) and MLP projections
(``W_in`` or ``W_gate_in``, ``W_out``), the embedding ``W_E`` and the unembedding ``W_U``
(:data:`MATRICES`); norms, biases and learned positions stay fp32. How a module holds them and
reads them back is :mod:`kvlens.components.quantizable`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from kvlens.components.quantizable import Quantizable
from kvlens.quantized import QuantizedMatrix

if TYPE_CHECKING:
    from kvlens.loading.gguf_blocks import QuantizedStateDict

FORMATS = ("q4_0", "q4_1", "q8_0")
"""The block formats a model's matrices can be held in."""


def require_fp32_cpu(dtype: torch.dtype, device: Any, n_devices: int = 1) -> None:
    """Refuse a model quantized weights cannot serve: blocks compute in float32, on the CPU,
    on one device.

    Raises:
        ValueError: naming what is not so.
    """
    where = torch.device(device) if device is not None else torch.device("cpu")
    if dtype != torch.float32 or where.type != "cpu" or n_devices != 1:
        raise ValueError(
            "quantized weights compute in float32 on the CPU, on one device; got "
            f"dtype={dtype}, device={where}, n_devices={n_devices}"
        )


def matrices(model: Any) -> Iterator[tuple[str, Quantizable, str, bool]]:
    """``(full name, module, parameter name, transposed)`` of every matrix that may be held
    as blocks (each module's ``block_matrices``), the embedding first and the unembedding last.
    ``transposed``: the blocks are ``[out, in]`` of an ``[in, out]`` parameter (every
    projection; not the embedding). A module replaced by a non-kvlens one has none."""
    parts = [("embed", model.embed)]
    for i, block in enumerate(model.blocks):
        parts += [(f"blocks.{i}.attn", block.attn), (f"blocks.{i}.mlp", block.mlp)]
    parts.append(("unembed", model.unembed))
    for prefix, module in parts:
        for name in getattr(module, "block_matrices", ()):
            yield f"{prefix}.{name}", module, name, module.blocks_transposed


class QuantizationMixin:
    """Quantized weights of a model: :meth:`quantize_`, :meth:`dequantize_`, what is held."""

    cfg: Any
    _fingerprint: str | None
    dense_file_matrices: tuple[str, ...] = ()
    """A quantized GGUF model's matrices stored in other types, dequantized at load."""

    @property
    def quantized_weights(self) -> dict[str, QuantizedMatrix]:
        """Every matrix held as blocks, by full name (empty for an fp32 model)."""
        return {
            full: module.quantized_weights[name]
            for full, module, name, _ in matrices(self)
            if name in module.quantized_weights
        }

    @property
    def is_quantized(self) -> bool:
        """Whether any weight matrix is held as blocks."""
        return bool(self.quantized_weights)

    def quantization_summary(self) -> list[str]:
        """One line per block format held (matrices, megabytes), and one for fp32 matrices."""
        held = self.quantized_weights
        lines = []
        by_format: dict[str, list[QuantizedMatrix]] = {}
        seen: set[int] = set()
        for matrix in held.values():
            if id(matrix.blocks) not in seen:  # tied embedding and unembedding: one set
                seen.add(id(matrix.blocks))
                by_format.setdefault(matrix.fmt, []).append(matrix)
        for fmt, group in sorted(by_format.items()):
            mb = sum(m.nbytes for m in group) / 1e6
            lines.append(f"{fmt}: {len(group)} matrices, {mb:.1f} MB")
        dense = [full for full, *_ in matrices(self) if full not in held]
        if held and dense:
            lines.append(f"fp32: {', '.join(dense)}")
        if self.dense_file_matrices:
            lines.append(
                "dequantized at load (types the kernels do not take): "
                + ", ".join(self.dense_file_matrices)
            )
        return lines

    def install_blocks_(self, state: QuantizedStateDict) -> None:
        """Hold the :class:`QuantizedMatrix` entries of ``state`` (full names, as
        :func:`kvlens.loading.gguf_blocks.quantized_state_dict` gives them) as blocks; the
        other entries are left to ``load_state_dict``."""
        for full, module, name, _ in matrices(self):
            entry = state.get(full)
            if isinstance(entry, QuantizedMatrix):
                module.quantize_weight_(name, entry, full)
        self._fingerprint = None

    def quantize_(self, fmt: str = "q8_0", progress: bool = False) -> None:
        """Round every weight matrix of this fp32 model to ``fmt``'s blocks and hold them so.

        ggml's reference rounding (a block of 32 weights along the input axis shares a
        scale). A matrix whose input width is not a multiple of 32 stays fp32 (see
        :meth:`quantization_summary`). An unembedding equal to the embedding's transpose (a
        tied checkpoint) shares its blocks.

        Raises:
            ValueError: ``fmt`` is not one of :data:`FORMATS`, or the model is already quantized.
        """
        if fmt not in FORMATS:
            raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
        if self.is_quantized:
            raise ValueError("the model already holds quantized weights; call dequantize_() first")
        weights = list(self.parameters())  # type: ignore[attr-defined]
        for param in weights:
            require_fp32_cpu(param.dtype, param.device, self.cfg.n_devices)
        todo = list(matrices(self))
        embed: tuple[Tensor, QuantizedMatrix] | None = None  # the fp32 embedding, its blocks
        for full, module, name, transposed in tqdm(
            todo, desc=f"quantizing to {fmt}", unit="matrix", disable=not progress
        ):
            weight: Tensor = getattr(module, name).detach()
            rows = weight.T if transposed else weight
            if rows.shape[1] % 32:
                continue
            if full == "unembed.W_U" and embed is not None and torch.equal(rows, embed[0]):
                module.quantize_weight_(name, embed[1], full)
                continue
            matrix = QuantizedMatrix.quantize(rows.float(), fmt)
            module.quantize_weight_(name, matrix, full)
            if full == "embed.W_E":
                embed = rows, matrix
        self._fingerprint = None

    def dequantize_(self) -> None:
        """Make every quantized matrix an fp32 parameter again, its exact dequantization."""
        for _, module, name, _ in matrices(self):
            if name in module.quantized_weights:
                module.dequantize_weight_(name)
        self._fingerprint = None

    def check_move(self, fn: Any) -> None:
        """Refuse a cast or move (``fn``, as ``nn.Module._apply`` gets it) that a quantized
        model cannot follow, before anything moves: its blocks compute in float32 on the CPU."""
        if not self.is_quantized:
            return
        floats, blocks = fn(torch.zeros(1)), fn(torch.zeros(1, dtype=torch.uint8))
        if blocks.dtype != torch.uint8 or blocks.device.type != "cpu":
            raise ValueError(
                f"this model holds quantized blocks, which stay uint8 on the CPU; this cast or "
                f"move would make them {blocks.dtype} on {blocks.device} (dequantize_() first)"
            )
        require_fp32_cpu(floats.dtype, floats.device)  # the blocks' products

    def _weights_to_fingerprint(self) -> Iterator[tuple[str, Tensor]]:
        """Every parameter, and every matrix's blocks, by name."""
        yield from self.named_parameters()  # type: ignore[attr-defined]
        for name, buffer in self.named_buffers():  # type: ignore[attr-defined]
            if name.endswith("_blocks"):
                yield name, buffer
