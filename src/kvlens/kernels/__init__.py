"""Native kernels for the decode hot path, compiled at first use, with torch as the fallback.

A decode step multiplies a few rows by every weight matrix of the model; on CPU that is bound by
the speed at which the weights stream from memory, and MKL's one-row products reach only part of
it (see docs/benchmarks.md). ``matmul.c`` streams the weights sequentially instead. It is compiled
once per machine with the system C compiler (``cc -O3 -march=native -fopenmp``) into
``~/.cache/kvlens/kernels`` (``$KVLENS_CACHE_DIR`` or ``$XDG_CACHE_HOME`` move it) and loaded with
ctypes; it shares torch's OpenMP runtime and thread count.

Nothing depends on it: with no compiler, a failed build, ``KVLENS_NATIVE=0`` in the environment,
or any input it does not handle (autograd, another dtype or device, more than
:data:`MAX_ROWS` rows), :func:`kvlens.components.linear.linear` uses torch.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

logger = logging.getLogger(__name__)

MAX_ROWS = 16
"""Products with more rows than this (prefill) go to torch, which is faster there."""

_SOURCES = tuple(sorted(Path(__file__).parent.glob("*.c")))
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
_SINGLE_THREAD_BYTES = 256 * 1024  # smaller weights are not worth waking a second thread
_SPLIT_COLUMNS_MIN = 4096  # as in matmul.c: from this many columns per thread, no partial sums
_lock = threading.Lock()
_state: dict[str, ctypes.CDLL | None] = {}


def cache_dir() -> Path:
    """Where compiled kernels are kept (one file per source, compiler and CPU)."""
    root = os.environ.get("KVLENS_CACHE_DIR")
    if root:
        return Path(root) / "kernels"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "kvlens" / "kernels"


def _cpu_signature() -> str:
    """The CPU's model and feature flags: ``-march=native`` builds are only valid on the same."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = [line for line in lines if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(wanted)))


def _build(compiler: str) -> Path:
    """Compile the C sources unless a build for them, this compiler and CPU exists; its path."""
    parts = [p.read_bytes() for p in _SOURCES]
    parts += [compiler.encode(), " ".join(_FLAGS).encode(), _cpu_signature().encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:20]
    directory = cache_dir()
    target = directory / f"kvlens-{key}.so"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *_FLAGS, *map(str, _SOURCES), "-o", tmp, "-lm"],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        os.replace(tmp, target)  # atomic: a concurrent build or reader never sees half a file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _openmp_runtimes() -> set[str]:
    """The distinct OpenMP runtime files mapped into this process (Linux; empty elsewhere)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return set()
    names = ("libgomp", "libiomp", "libomp")
    return {line.split()[-1] for line in maps.splitlines() if any(n in line for n in names)}


def _load() -> ctypes.CDLL | None:
    if os.environ.get("KVLENS_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not _SOURCES:
        logger.warning("kvlens: the kernels' C sources are not installed; using torch")
        return None
    if compiler is None:
        logger.info("kvlens: no C compiler found; using torch for decode matrix products")
        return None
    before = _openmp_runtimes()
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", "") or error
        logger.warning("kvlens: native kernels unavailable, using torch (%s)", detail)
        return None
    if before and len(_openmp_runtimes()) > len(before):
        # A second OpenMP runtime would run its own thread pool beside torch's, and two pools
        # spinning on the same cores stall each other; torch alone is the safer choice.
        logger.warning("kvlens: native kernels link another OpenMP runtime; using torch")
        return None
    i64, ptr, f32, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    signatures = {
        "kvlens_matmul_small": [i64, i64, i64, ptr, i64, ptr, ptr, ptr, ptr, i32],
        "kvlens_rms_norm": [i64, i64, ptr, i64, ptr, f32, ptr],
        "kvlens_decode_attention": [i64] * 5
        + [ptr, i64, i64, ptr, ptr, i64, i64, i64]
        + [ptr, i64, f32, ptr, ptr, i32],
        "kvlens_rotary_inplace": [i64, i64, i64, ptr, i64, i64, ptr, ptr, i64, i32],
        "kvlens_silu_mul": [i64, i64, ptr, i64, ptr],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = None, argtypes
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first call; ``None`` when unavailable."""
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                _state["lib"] = _load()
    return _state["lib"]


def available() -> bool:
    """Whether the native kernels are built and loaded (building them if need be)."""
    return library() is not None


def handles(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether :func:`matmul` takes this product: fp32 on CPU, few rows, no autograd."""
    if x.dtype is not torch.float32 or weight.dtype is not torch.float32:
        return False
    if x.device.type != "cpu" or weight.device.type != "cpu" or weight.dim() != 2:
        return False
    if x.numel() > MAX_ROWS * x.shape[-1] or x.shape[-1] != weight.shape[0]:
        return False
    if torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        return False
    if bias is not None and (bias.dtype is not torch.float32 or bias.device.type != "cpu"):
        return False
    return weight.is_contiguous() and x.numel() > 0 and library() is not None


def matmul(
    x: Float[Tensor, "... d_in"],
    weight: Float[Tensor, "d_in d_out"],
    bias: Float[Tensor, " d_out"] | None = None,
    threads: int | None = None,
) -> Float[Tensor, "... d_out"]:
    """``x @ weight + bias`` by the native kernel; the caller checks :func:`handles` first.

    Args:
        x: At most :data:`MAX_ROWS` rows in all (``x.numel() / d_in``).
        weight: Contiguous ``[d_in, d_out]``.
        bias: Optional ``[d_out]``.
        threads: OpenMP threads; default torch's count (one for small weights).
    """
    lib = library()
    if lib is None:
        raise RuntimeError("kvlens native kernels are not available")
    d_in, d_out = weight.shape
    rows = x.reshape(-1, d_in)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    n_rows = rows.shape[0]
    if threads is None:
        small = d_in * d_out * 4 < _SINGLE_THREAD_BYTES
        threads = 1 if small else torch.get_num_threads()
    out = torch.empty(n_rows, d_out, dtype=torch.float32)
    split_k = threads > 1 and d_out < _SPLIT_COLUMNS_MIN * threads
    scratch = torch.empty((threads - 1) * n_rows * d_out) if split_k else None
    lib.kvlens_matmul_small(
        n_rows,
        d_in,
        d_out,
        rows.data_ptr(),
        rows.stride(0),
        weight.data_ptr(),
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
        None if scratch is None else scratch.data_ptr(),
        threads,
    )
    return out.view(*x.shape[:-1], d_out)


def _plain_cpu_float(*tensors: Tensor | None) -> bool:
    """fp32 CPU tensors with no autograd to keep (``None`` entries are skipped)."""
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if t.dtype is not torch.float32 or t.device.type != "cpu" or (grad and t.requires_grad):
            return False
    return True


def handles_rms_norm(x: Tensor, weight: Tensor | None) -> bool:
    """Whether :func:`rms_norm` takes this input: fp32 on CPU, few rows, no autograd."""
    if x.numel() > MAX_ROWS * x.shape[-1] or x.numel() == 0 or not _plain_cpu_float(x, weight):
        return False
    if weight is not None and (weight.shape != x.shape[-1:] or not weight.is_contiguous()):
        return False
    return library() is not None


def rms_norm(
    x: Float[Tensor, "... d"], weight: Float[Tensor, " d"] | None, eps: float
) -> Float[Tensor, "... d"]:
    """``x / sqrt(mean(x**2) + eps) * weight`` on the last axis; see :func:`handles_rms_norm`."""
    lib = library()
    if lib is None:
        raise RuntimeError("kvlens native kernels are not available")
    d = x.shape[-1]
    rows = x.reshape(-1, d)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=torch.float32)
    w = None if weight is None else weight.data_ptr()
    lib.kvlens_rms_norm(rows.shape[0], d, rows.data_ptr(), rows.stride(0), w, eps, out.data_ptr())
    return out.view(x.shape)


_MAX_GROUP = 16  # query heads per key head that decode.c handles


def handles_decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> bool:
    """Whether :func:`decode_attention` takes these: one query per row, fp32 CPU, no autograd."""
    batch, n_heads, n_new, d_head = q.shape
    n_kv = k.shape[1]
    if k.dim() != 4 or k.shape[3] != d_head:
        return False
    if n_new != 1 or n_heads % n_kv or n_heads // n_kv > _MAX_GROUP or k.shape[2] == 0:
        return False
    if k.shape != v.shape or k.stride() != v.stride() or k.shape[0] != batch:
        return False
    if q.stride(-1) != 1 or k.stride(-1) != 1 or not _plain_cpu_float(q, k, v):
        return False
    if mask is not None and (
        mask.dtype is not torch.bool
        or tuple(mask.shape) != (batch, 1, 1, k.shape[2])
        or mask.stride(-1) != 1
    ):
        return False
    return library() is not None


def decode_attention(
    q: Float[Tensor, "batch head_index 1 d_head"],
    k: Float[Tensor, "batch kv_head kv_pos d_head"],
    v: Float[Tensor, "batch kv_head kv_pos d_head"],
    mask: Tensor | None = None,
    threads: int | None = None,
) -> Float[Tensor, "batch head_index 1 d_head"]:
    """Softmax attention of one query per row over keys and values read in place.

    Args:
        q: Queries (any strides with a contiguous last axis).
        k: Keys, e.g. views of the cache's storage; query head ``h`` reads key head
            ``h // (n_heads / n_kv)``.
        v: Values, same shape and strides as ``k``.
        mask: Bool ``[batch, 1, 1, kv_pos]``, True where the query may attend; a row with no
            allowed key gets zeros.
        threads: OpenMP threads; default torch's count.

    Check :func:`handles_decode_attention` first. The result is a view of a contiguous
    ``[batch, 1, head_index, d_head]`` tensor, so transposing it back costs nothing.
    """
    lib = library()
    if lib is None:
        raise RuntimeError("kvlens native kernels are not available")
    batch, n_heads, _, d_head = q.shape
    n_kv, kv_len = k.shape[1], k.shape[2]
    out = torch.empty(batch, 1, n_heads, d_head, dtype=torch.float32)
    scratch = torch.empty(batch * n_heads * kv_len, dtype=torch.float32)
    mask_ptr, mask_stride = None, 0
    if mask is not None:
        mask_ptr, mask_stride = mask.data_ptr(), mask.stride(0)
    lib.kvlens_decode_attention(
        batch,
        n_heads,
        n_kv,
        d_head,
        kv_len,
        q.data_ptr(),
        q.stride(0),
        q.stride(1),
        k.data_ptr(),
        v.data_ptr(),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        mask_ptr,
        mask_stride,
        d_head**-0.5,
        out.data_ptr(),
        scratch.data_ptr(),
        threads or torch.get_num_threads(),
    )
    return out.transpose(1, 2)


def handles_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> bool:
    """Whether :func:`rotary_inplace` takes these (fp32 CPU, no autograd, few rows)."""
    batch, n_new, heads, d_head = x.shape
    half = cos.shape[-1]
    if x.numel() > MAX_ROWS * heads * d_head or 2 * half > d_head or x.stride(-1) != 1:
        return False
    if cos.shape != sin.shape or cos.stride() != sin.stride() or cos.stride(-1) != 1:
        return False
    if cos.dim() != 4 or cos.shape[1] != n_new or cos.shape[0] not in (1, batch):
        return False
    return x.stride(0) == n_new * x.stride(1) and _plain_cpu_float(x, cos, sin) and available()


def rotary_inplace(
    x: Float[Tensor, "batch pos head d_head"],
    cos: Float[Tensor, "batch pos 1 rotary_half"],
    sin: Float[Tensor, "batch pos 1 rotary_half"],
    adjacent_pairs: bool = False,
) -> Float[Tensor, "batch pos head d_head"]:
    """Rotate ``x`` in place as :func:`kvlens.components.positions.apply_rotary` would; ``x``.

    Check :func:`handles_rotary` first. ``x`` must be a tensor nobody else reads (a fresh
    projection), since its values are overwritten.
    """
    lib = library()
    if lib is None:
        raise RuntimeError("kvlens native kernels are not available")
    batch, n_new, heads, _ = x.shape
    rows = batch * n_new
    # Rows (b, p) of x are x.stride(1) apart (checked); give cos and sin the same row layout.
    if cos.shape[0] == 1 and n_new == 1:
        cos_row = 0  # one angle row for every batch row
    else:
        if cos.shape[0] != batch or cos.stride(0) != n_new * cos.stride(1):
            cos = cos.expand(batch, -1, -1, -1).contiguous()
            sin = sin.expand(batch, -1, -1, -1).contiguous()
        cos_row = cos.stride(1)
    lib.kvlens_rotary_inplace(
        rows,
        heads,
        cos.shape[-1],
        x.data_ptr(),
        x.stride(1),
        x.stride(2),
        cos.data_ptr(),
        sin.data_ptr(),
        cos_row,
        int(adjacent_pairs),
    )
    return x


def handles_silu_mul(gate_up: Tensor) -> bool:
    """Whether :func:`silu_mul` takes ``gate_up`` ``[..., 2 * d_mlp]``."""
    rows = gate_up.numel() // max(gate_up.shape[-1], 1)
    if rows > MAX_ROWS or gate_up.shape[-1] % 2 or gate_up.stride(-1) != 1:
        return False
    return _plain_cpu_float(gate_up) and available()


def silu_mul(gate_up: Float[Tensor, "... two_d_mlp"]) -> Float[Tensor, "... d_mlp"]:
    """``silu(gate) * up`` where ``gate_up`` holds the gate then the input projection."""
    lib = library()
    if lib is None:
        raise RuntimeError("kvlens native kernels are not available")
    d = gate_up.shape[-1] // 2
    rows = gate_up.reshape(-1, 2 * d)
    out = torch.empty(rows.shape[0], d, dtype=torch.float32)
    lib.kvlens_silu_mul(rows.shape[0], d, rows.data_ptr(), rows.stride(0), out.data_ptr())
    return out.view(*gate_up.shape[:-1], d)
