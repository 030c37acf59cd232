"""CPU kernels in C (paged attention, fused norm/RoPE/SiLU), compiled on first use
and called through ctypes; float32 only.

Why C: the torch reference gathers each sequence's blocks and runs two bmm per
sequence and layer; at 16 decoding sequences that is ~100 small ops per layer and a
copy of every key and value, which measured ~100 ms of a ~180 ms SmolLM2 step on a
2-core CPU (and two thirds of a prefill step). The kernels read the blocks in place,
one call per layer for the decodes and one for the prefill chunks. The fused ops
replace the ~40 small torch ops per layer of RMSNorm, residual adds, RoPE and SwiGLU.

Why not a torch extension: compiling against torch's headers takes minutes on a small
machine; this file needs only a C compiler (~1 s). Without one, `load()` returns None
and callers keep the torch reference. The library is cached per source, flags and CPU.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

SOURCES = [Path(__file__).with_name("csrc") / name for name in ("paged_attention.c", "fused_ops.c")]
# -ffast-math lets the exp loop use glibc's vector expf (libmvec); scores are finite
FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffast-math", "-fPIC"]
# Linked without -ffast-math: with it, gcc adds crtfastmath.o, whose constructor turns on
# flush-to-zero for the whole process when the library loads (subnormal floats became 0 everywhere).
LINK_FLAGS = ["-shared", "-fopenmp"]
_INT64, _PTR, _FLOAT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
SIGNATURES = {
    "paged_decode_attention_f32": [_PTR, _INT64, _PTR, _PTR, _PTR, _INT64, _PTR, _PTR,
                                   _INT64, _INT64, _INT64, _INT64, _INT64, _FLOAT],
    "paged_prefill_attention_f32": [_PTR, _INT64, _PTR, _PTR, _PTR, _INT64, _PTR, _PTR, _PTR,
                                    _INT64, _INT64, _INT64, _INT64, _INT64, _FLOAT],
    "add_rms_norm_f32": [_PTR, _PTR, _PTR, _PTR, _INT64, _INT64, _FLOAT],
    "rope_f32": [_PTR, _INT64, _INT64, _INT64, _INT64, _PTR, _PTR, _PTR],
    "silu_and_mul_f32": [_PTR, _PTR, _INT64, _INT64],
}


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "llmserve" / "kernels"


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The compiled kernel library, or None when no C compiler is available."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    library = cache_dir() / f"cpu_kernels-{_build_key(compiler)}.so"
    if not library.exists():
        try:
            _compile(compiler, library)
        except (OSError, subprocess.CalledProcessError):
            return None
    lib = ctypes.CDLL(str(library))
    for name, argtypes in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = None, argtypes
    return lib


def usable(x: torch.Tensor) -> bool:
    """Whether the C kernels can take x: float32 on the CPU, with a compiler at hand."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and load() is not None


def _build_key(compiler: str) -> str:
    # -march=native code is only valid on the CPU it was built for
    cpu = platform.processor() + _cpu_flags()
    text = b"".join(path.read_bytes() for path in SOURCES) + " ".join([compiler, *FLAGS, *LINK_FLAGS, cpu]).encode()
    return hashlib.sha256(text).hexdigest()[:16]


def _cpu_flags() -> str:
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.machine()


def _compile(compiler: str, library: Path) -> None:
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
        built = Path(tmp) / library.name
        objects = [str(Path(tmp) / f"{source.stem}.o") for source in SOURCES]
        for source, obj in zip(SOURCES, objects):
            subprocess.run([compiler, *FLAGS, "-c", str(source), "-o", obj], check=True, capture_output=True)
        subprocess.run([compiler, *LINK_FLAGS, *objects, "-o", str(built), "-lmvec", "-lm"], check=True,
                       capture_output=True)
        os.replace(built, library)  # atomic: concurrent first uses never see a partial file


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, H, D] (rows may be strided) over caches [N, S, Hkv, D]; returns [B, H, D] float32."""
    lib = load()
    assert lib is not None, "no C compiler: use the torch reference"
    assert q.dtype == k_cache.dtype == torch.float32 and q.stride(2) == 1 and q.stride(1) == q.shape[2]
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    block_tables = block_tables.to(torch.int32).contiguous()
    context_lens = context_lens.to(torch.int32).contiguous()
    num_seqs, num_heads, head_dim = q.shape
    out = torch.empty(num_seqs, num_heads, head_dim, dtype=torch.float32)
    lib.paged_decode_attention_f32(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
        block_tables.data_ptr(), block_tables.stride(0), context_lens.data_ptr(), out.data_ptr(),
        num_seqs, num_heads, k_cache.shape[2], head_dim, k_cache.shape[1], scale)
    return out


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, query_start_loc: torch.Tensor, context_lens: torch.Tensor,
                            scale: float) -> torch.Tensor:
    """Causal attention of ragged chunks q [Tp, H, D] (sequence b owns rows query_start_loc[b]..
    [b+1], the last of its context_lens[b] positions) over caches [N, S, Hkv, D]."""
    assert q.dtype == k_cache.dtype == torch.float32 and q.stride(2) == 1 and q.stride(1) == q.shape[2]
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    block_tables, query_start_loc, context_lens = (
        t.to(torch.int32).contiguous() for t in (block_tables, query_start_loc, context_lens))
    num_tokens, num_heads, head_dim = q.shape
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=torch.float32)
    load().paged_prefill_attention_f32(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(),
        block_tables.stride(0), query_start_loc.data_ptr(), context_lens.data_ptr(), out.data_ptr(),
        context_lens.shape[0], num_heads, k_cache.shape[2], head_dim, k_cache.shape[1], scale)
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(x + residual) * weight, x + residual) for [T, E]; the sum is written into
    `residual` in place (with no residual, x is the stream and is left as is)."""
    if residual is None:
        residual, delta = x.contiguous(), None  # read only: no add to do
    else:
        delta = x.contiguous()
    assert residual.is_contiguous() and weight.is_contiguous()
    out = torch.empty_like(residual)
    load().add_rms_norm_f32(residual.data_ptr(), None if delta is None else delta.data_ptr(), weight.data_ptr(),
                            out.data_ptr(), residual.shape[0], residual.shape[1], eps)
    return out, residual


def rope_(x: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, H, D] in place; heads of a token adjacent, rows may be strided."""
    num_tokens, num_heads, head_dim = x.shape
    assert x.stride(2) == 1 and x.stride(1) == head_dim and positions.dtype == torch.int64
    assert cos_table.is_contiguous() and sin_table.is_contiguous() and positions.is_contiguous()
    load().rope_f32(x.data_ptr(), x.stride(0), num_tokens, num_heads, head_dim, positions.data_ptr(),
                    cos_table.data_ptr(), sin_table.data_ptr())
    return x


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2I] holding gate then up -> silu(gate) * up [T, I]."""
    gate_up = gate_up.contiguous()
    num_tokens, size = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(num_tokens, size, dtype=gate_up.dtype)
    load().silu_and_mul_f32(gate_up.data_ptr(), out.data_ptr(), num_tokens, size)
    return out
