"""Weight-only linears, TensorRT-LLM `W8A16` and `W4A16_AWQ`: y = (x * prequant_scale) W^T, no bias.

Only W is quantized: the input is never rounded to integers, and the arithmetic is at least as precise
as x's dtype (float16 on CPU runs in float32).
- bits 8: `weight` int8 [N, K], `weight_scale` [N]; W = weight * weight_scale[:, None].
- bits 4 (ModelOpt's AWQ layout): `weight` int8 [N/2, K], byte (r, k) holds the two's-complement int4 of
  row 2r in its low nibble and of row 2r+1 in its high one; `weight_scale` [N, K/G];
  W[n, k] = int4(n, k) * weight_scale[n, k // G].
`prequant_scale` [K] (AWQ's activation scaling) is optional (`has_prequant`); without it p = 1.

CUDA: float16/bfloat16 with M <= TRITON_MAX_M runs one Triton GEMM that reads the quantized weight once and
dequantizes it in registers; float32, larger M (prefill) and group sizes that cannot tile dequantize W to
x's dtype once per call and use torch's matmul. Decode (M <= 16) splits K so that every SM streams weight.
Measured on an H200 (bf16, us of GPU time per call, CUDA-graph replay, int4 in groups of 128, llama-8b's
linears; `python bench/weight_only_linear.py cuda`):
  [N x K]      M | triton W4  triton W8 | bf16 F.linear (unquantized)
   6144x4096   1 |    16.3       17.8   |   13.8
   4096x4096   1 |    12.0       11.9   |   10.1
  28672x4096   1 |    55.7       48.8   |   56.4
   4096x14336  1 |    30.8       31.0   |   31.9
   6144x4096  16 |    19.6       18.5   |   13.4
   4096x4096  16 |    13.9       12.5   |    9.3
  28672x4096  16 |    61.3       50.0   |   57.4
   4096x14336 16 |    33.8       31.8   |   32.6
Decode thus runs at bf16's speed, not at its 4x (int4) or 2x (int8) fewer bytes: 28672x4096 int4 streams
~1 TB/s of an H200's ~4. A tensor-core-free GEMV (float32 broadcast-multiply, sums over K) measured slower
(int4 M=1: 18.0 / 13.9 / 69.8 / 34.9). Before the decode tiles (64 weight rows, BLOCK_K 128-256), int4 at
M=1 took 57.6 us on 14336x4096. Larger M, as measured before this change (int4 now makes two dots per
byte tile, unmeasured; the int8 tiles are unchanged):
  [N x K]         M | triton W4  dense W4 | triton W8  dense W8 | bf16 F.linear
   14336x4096  256 |   238.8      736.8   |   159.5      628.9   |   44.6
   14336x4096 1024 |   887.7      845.5   |   541.9      735.1   |  155.3
   14336x4096 4096 |  3428.9     1317.4   |  2158.4     1269.5   |  721.7
On an 8B model's linears the kernel beats dequantizing up to M ~ 256-1024 and loses 2.6x at 4096, hence
TRITON_MAX_M = 256.

CPU: us per call, threads=2, AMD EPYC (AVX512-BF16, VNNI), torch 2.13, G = 64, through the module
(`python bench/weight_only_linear.py cpu`); dynamic int8 is for comparison only: it quantizes x (W8A8).
  [N x K]    M | fp32 F.linear  dyn int8 | W4 bf16  W8 bf16 | W4 fp32  W8 fp32
  1536x576   1 |       69          29    |    38       38   |    86       87
  1536x576  16 |      250          68    |   156      146   |   287      271
  576x1536   1 |       63          31    |    40       37   |    76       75
  576x1536  16 |      291          65    |   136      136   |   258      263
  960x576    1 |       45          26    |    29       28   |    60       60
  960x576   16 |      158          49    |   100      104   |   198      199
  3072x576   1 |      138          39    |    67       69   |   150      156
  3072x576  16 |      509         103    |   232      238   |   593      574
The packed kernels (`_weight_int4pack_mm_for_cpu`, `_weight_int8pack_mm`) are fast for bfloat16 inputs
only (float32 / float16 ones take a reference loop, 8-20x slower than float32 F.linear) and cost about M
times their M=1 time, so they serve M <= CPU_PACKED_MAX_M and a cached bfloat16 dequantized weight serves
larger M (oneDNN's bf16 GEMM is 1.1-2.5x faster there). On CPUs with bf16 units (`cpu_compute_dtype`)
every input takes these bf16 paths, also in a float32 model: W4A16/W8A16 mean 16-bit inputs, and decode
is bound by the bytes of weight read per token (a float32 SmolLM2 step reads ~540 MB), which only the
packed kernels cut. Elsewhere a cached float32 dequantized weight and F.linear run it exactly, at float32
speed.

Caches (CPU only; CUDA reads the buffers as they are, so CUDA graphs see no lazy work) are built on first
use and keyed on the data pointer and version counter of `weight`, `weight_scale`, `prequant_scale`, so a
later copy into them invalidates the cache. Tensors made under `torch.inference_mode` have no version
counter: after changing those in place, call `prepare()`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from llmserve.ops.triton_support import jit as _jit, tl, triton

TRITON_MAX_M = 256  # rows above which CUDA dequantizes W once and calls torch's matmul (see the table)
CPU_PACKED_MAX_M = 8  # bf16 packed kernels win up to here on CPU (measured: tie at 8, 1.4-2x slower at 16)
CPU_INT4_GROUP_SIZES = (32, 64, 128, 256)  # what `_weight_int4pack_mm_for_cpu` accepts


class GemmTiles(NamedTuple):
    """The Triton kernel's launch shape."""
    block_m: int
    block_r: int  # weight rows per program (int4: two output rows each)
    block_k: int  # at most the int4 scale group
    num_warps: int
    num_stages: int


@functools.lru_cache(maxsize=None)
def cpu_compute_dtype() -> torch.dtype:
    """bfloat16 where the CPU computes it natively (AVX512-BF16 or AMX), else float32."""
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.bfloat16 if native else torch.float32


# ---- the formats ----------------------------------------------------------------------------
def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] with values in [-8, 7] -> int8 [N/2, K]: row 2r in the low nibble, 2r+1 in the high."""
    assert values.dtype == torch.int8 and values.shape[0] % 2 == 0, "pack_int4 wants int8 [N, K], N even"
    assert values.min() >= -8 and values.max() <= 7, "int4 values must lie in [-8, 7]"
    return (values[1::2] << 4) | (values[0::2] & 0x0F)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: int8 [N/2, K] -> int8 [N, K] in [-8, 7]."""
    low = ((packed & 0x0F) ^ 8) - 8  # sign-extends the nibble
    high = packed >> 4  # arithmetic shift: already signed
    return torch.stack([low, high], dim=1).reshape(-1, packed.shape[1])


def dequantize(weight: torch.Tensor, weight_scale: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """The float32 W [N, K] that a `bits`-bit weight and its scales stand for."""
    if bits == 8:
        return weight.float() * weight_scale.float()[:, None]
    values = unpack_int4(weight).float()
    num_rows, num_cols = values.shape
    groups = values.view(num_rows, num_cols // group_size, group_size) * weight_scale.float()[..., None]
    return groups.view(num_rows, num_cols)


def pack_int4_for_cpu(weight: torch.Tensor, weight_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our int4 weight as `_weight_int4pack_mm_for_cpu` wants it: packed unsigned u = v + 8, and
    scales_and_zeros [K/G, N, 2] bfloat16; that kernel computes (u - 8) * scale + zero, so zero = 0."""
    unsigned = unpack_int4(weight).to(torch.int32) + 8  # [N, K] in [0, 15]
    packed = torch._convert_weight_to_int4pack_for_cpu(unsigned, 1)
    scale = weight_scale.t()  # [K/G, N]
    return packed, torch.stack([scale, torch.zeros_like(scale)], dim=-1).to(torch.bfloat16).contiguous()


# ---- the CUDA kernel ------------------------------------------------------------------------
# It reads each weight byte once: an int4 byte (r, k) feeds output rows 2r (low nibble) and 2r+1 (high),
# accumulated apart in float32 as acc_lo and acc_hi. R is the weight's row count: N for int8, N/2 for int4.
@_jit
def _store_rows(y_ptr, acc_lo, acc_hi, scale_ptr, offs_m, offs_r, M, R, stride_ym, BITS: tl.constexpr):
    """y[m, output row] = acc for the rows tile; int8 applies its per-channel scale here."""
    mask = (offs_m < M)[:, None] & (offs_r < R)[None, :]
    y_rows = y_ptr + offs_m[:, None] * stride_ym
    if BITS == 4:
        tl.store(y_rows + 2 * offs_r[None, :], acc_lo.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(y_rows + 2 * offs_r[None, :] + 1, acc_hi.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        scale = tl.load(scale_ptr + offs_r, mask=offs_r < R, other=0.0)
        tl.store(y_rows + offs_r[None, :], (acc_lo * scale[None, :]).to(y_ptr.dtype.element_ty), mask=mask)


@_jit
def _weight_only_gemm_kernel(x_ptr, w_ptr, scale_ptr, prequant_ptr, y_ptr, M, R, K, K_PER_SPLIT,
                             stride_xm, stride_w, stride_scale, stride_ym, stride_split,
                             BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_PREQUANT: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    # program (m tile, rows tile, k split); with several splits each writes its float32 partial sum to its
    # own slice of y (stride_split apart) and the caller adds them up. An int4 byte tile makes two dots.
    split = tl.program_id(2)
    k_start = split * K_PER_SPLIT
    k_end = tl.minimum(K, k_start + K_PER_SPLIT)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_m, mask_r = offs_m < M, offs_r < R
    acc_lo = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    acc_hi = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        if HAS_PREQUANT:
            prequant = tl.load(prequant_ptr + offs_k, mask=mask_k, other=0.0)
            x = (x.to(tl.float32) * prequant[None, :]).to(y_ptr.dtype.element_ty)
        w = tl.load(w_ptr + offs_r[None, :] * stride_w + offs_k[:, None],
                    mask=mask_k[:, None] & mask_r[None, :], other=0)  # [BLOCK_K, BLOCK_R] int8
        if BITS == 4:
            w = w.to(tl.int32)
            # BLOCK_K divides GROUP_SIZE: one scale per output row for the tile, applied in float32
            scale_lo = scale_ptr + 2 * offs_r * stride_scale + k0 // GROUP_SIZE
            low, high = ((w << 28) >> 28).to(x.dtype), (w >> 4).to(x.dtype)  # arithmetic shifts sign-extend
            acc_lo += tl.dot(x, low) * tl.load(scale_lo, mask=mask_r, other=0.0)[None, :]
            acc_hi += tl.dot(x, high) * tl.load(scale_lo + stride_scale, mask=mask_r, other=0.0)[None, :]
        else:
            acc_lo += tl.dot(x, w.to(x.dtype))  # |int8| <= 128 is exact in float16 and bfloat16
    _store_rows(y_ptr + split * stride_split, acc_lo, acc_hi, scale_ptr, offs_m, offs_r, M, R, stride_ym, BITS)


def triton_block_k(bits: int, group_size: int | None) -> int | None:
    """The kernel's K tile: 128 for int8; for int4 64, or the group size when smaller, so that a tile never
    straddles two groups; None when the group size cannot tile (not a power of two >= 16)."""
    if bits == 8:
        return 128
    is_power_of_two = group_size & (group_size - 1) == 0
    return min(64, group_size) if is_power_of_two and group_size >= 16 else None


def weight_only_mm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   prequant_scale: torch.Tensor | None, bits: int, group_size: int | None,
                   tiles: GemmTiles | None = None) -> torch.Tensor:
    """(x * prequant_scale) W^T for contiguous x [M, K] float16/bfloat16 on CUDA: one Triton kernel, plus a
    sum when decode splits K. `tiles` defaults to `_tiles`; an int4 BLOCK_K must divide the group size."""
    num_rows, num_cols = x.shape
    tiles = tiles or _tiles(num_rows, bits, group_size)
    assert bits == 8 or group_size % tiles.block_k == 0, f"BLOCK_K {tiles.block_k} straddles int4 groups"
    grid_m, grid_r = triton.cdiv(num_rows, tiles.block_m), triton.cdiv(weight.shape[0], tiles.block_r)
    k_per_split = num_cols
    if num_rows <= 16:
        k_per_split = _k_per_split(num_cols, tiles.block_k, grid_m * grid_r, x.device)
    y = _partial_sums(x, weight.shape[0] * (8 // bits), k_per_split)
    prequant = weight_scale if prequant_scale is None else prequant_scale  # not read without a prequant
    _weight_only_gemm_kernel[(grid_m, grid_r, y.shape[0])](
        x, weight, weight_scale, prequant, y, num_rows, weight.shape[0], num_cols, k_per_split,
        x.stride(0), weight.stride(0), weight_scale.stride(0), y.stride(1), y.stride(0),
        BITS=bits, GROUP_SIZE=group_size or 1, HAS_PREQUANT=prequant_scale is not None,
        BLOCK_M=tiles.block_m, BLOCK_R=tiles.block_r, BLOCK_K=tiles.block_k,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return y[0] if y.shape[0] == 1 else y.sum(dim=0).to(x.dtype)


def _partial_sums(x: torch.Tensor, out_features: int, k_per_split: int) -> torch.Tensor:
    """y [splits, M, N]: x's dtype when K is not split, else float32 partial sums."""
    splits = triton.cdiv(x.shape[1], k_per_split)
    dtype = x.dtype if splits == 1 else torch.float32
    return torch.empty((splits, x.shape[0], out_features), dtype=dtype, device=x.device)


def _tiles(num_rows: int, bits: int, group_size: int | None) -> GemmTiles:
    """The best of small sweeps on an H200 (llama-8b linears): for decode (M 1-16 swept) 64 weight rows by
    a wide K tile, with K split across SMs; wider M tiles from 17 rows (M 64 and 256 swept)."""
    if num_rows <= 16:
        return GemmTiles(16, 64, 256, 4, 4) if bits == 8 else GemmTiles(16, 64, min(128, group_size), 4, 3)
    block_k = triton_block_k(bits, group_size)
    block_m = 64 if num_rows <= 64 else 128
    if bits == 8:
        return GemmTiles(block_m, 128, block_k, 4 if block_m == 64 else 8, 3)
    return GemmTiles(block_m, 32, block_k, 4, 3)


def _k_per_split(num_cols: int, block_k: int, tiles: int, device: torch.device) -> int:
    """Decode (few rows) has too few output tiles to keep every SM streaming weights: split K so that about
    two programs per SM run, each over at least two K tiles (a multiple of block_k, so that no tile
    straddles a scale group)."""
    k_tiles = triton.cdiv(num_cols, block_k)
    splits = max(1, min(k_tiles // 2, triton.cdiv(2 * _sm_count(device), tiles)))
    return triton.cdiv(k_tiles, splits) * block_k


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the Triton interpreter (CPU tensors): still split K, as on a small GPU
    return torch.cuda.get_device_properties(device).multi_processor_count


# ---- the module -----------------------------------------------------------------------------
def _check_args(in_features: int, out_features: int, bits: int, group_size: int | None) -> None:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if in_features < 1 or out_features < 1:
        raise ValueError(f"features must be positive, got in={in_features}, out={out_features}")
    if bits == 8 and group_size is not None:
        raise ValueError(f"int8 weights have one scale per output channel; group_size must be None, got {group_size}")
    if bits == 4 and (group_size is None or group_size < 1 or in_features % group_size):
        raise ValueError(f"int4 needs a group_size dividing in_features={in_features}, got {group_size}")
    if bits == 4 and out_features % 2:
        raise ValueError(f"int4 packs output rows in pairs; out_features must be even, got {out_features}")


class WeightOnlyLinear(nn.Module):
    """y = (x * prequant_scale) W^T (no bias), W stored as int8 per channel or int4 in groups."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None = None,
                 has_prequant: bool = True, device: torch.device | str | None = None):
        super().__init__()
        _check_args(in_features, out_features, bits, group_size)
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        weight_rows = out_features if bits == 8 else out_features // 2
        self.weight = nn.Parameter(torch.zeros(weight_rows, in_features, dtype=torch.int8, device=device),
                                   requires_grad=False)
        scale_shape = (out_features,) if bits == 8 else (out_features, in_features // group_size)
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=torch.float32, device=device))
        prequant = torch.ones(in_features, dtype=torch.float32, device=device) if has_prequant else None
        self.register_buffer("prequant_scale", prequant)
        self._cache: dict[str, tuple[list, object]] = {}  # CPU forms of the weight, see `_cached`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()  # [M, K]
        y = self._cuda_forward(x2) if x.is_cuda else self._cpu_forward(x2)
        return y.reshape(*shape[:-1], self.out_features)

    def prepare(self) -> None:
        """Drop the CPU caches; they are rebuilt on the next forward (needed only after in-place
        changes to inference-mode buffers, which carry no version counter)."""
        self._cache.clear()

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """W * prequant_scale[None, :] as `dtype` [N, K]: x (W diag p)^T = (x * p) W^T."""
        weight = dequantize(self.weight, self.weight_scale, self.bits, self.group_size)
        if self.prequant_scale is not None:
            weight = weight * self.prequant_scale
        return weight.to(dtype)

    def _cuda_forward(self, x2: torch.Tensor) -> torch.Tensor:
        use_triton = (triton is not None and x2.dtype in (torch.float16, torch.bfloat16)
                      and 1 <= x2.shape[0] <= TRITON_MAX_M
                      and triton_block_k(self.bits, self.group_size) is not None)
        if use_triton:
            return weight_only_mm(x2, self.weight, self.weight_scale, self.prequant_scale, self.bits, self.group_size)
        return F.linear(x2, self.dense_weight(x2.dtype))

    def _cpu_forward(self, x2: torch.Tensor) -> torch.Tensor:
        # W4A16 / W8A16 take 16-bit inputs: on CPUs with bf16 units every input computes in bf16 (a float32
        # model keeps float32 everywhere else), elsewhere in float32 (CPU float16 GEMMs are slow)
        dtype = cpu_compute_dtype()
        if dtype == torch.bfloat16 and 1 <= x2.shape[0] <= CPU_PACKED_MAX_M and self._cpu_packed_ok():
            return self._cpu_packed_mm(x2.to(dtype)).to(x2.dtype)
        weight = self._cached(f"dense-{dtype}", lambda: self.dense_weight(dtype))
        return F.linear(x2.to(dtype), weight).to(x2.dtype)

    def _cpu_packed_ok(self) -> bool:
        if self.bits == 8:
            return self.in_features % 16 == 0  # `_weight_int8pack_mm` misreads other K (garbage or a crash)
        return self.group_size in CPU_INT4_GROUP_SIZES and self.out_features % 16 == 0

    def _cpu_packed_mm(self, x2: torch.Tensor) -> torch.Tensor:
        weight, scale, prequant = self._cached("packed", self._pack_for_cpu)
        if prequant is not None:
            x2 = x2 * prequant  # in bfloat16, as a bfloat16 checkpoint stores the prequant
        if self.bits == 8:
            return torch._weight_int8pack_mm(x2, weight, scale)
        return torch._weight_int4pack_mm_for_cpu(x2, weight, self.group_size, scale)

    def _pack_for_cpu(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(weight, scales, prequant) as the bfloat16 CPU kernels take them."""
        prequant = None if self.prequant_scale is None else self.prequant_scale.to(torch.bfloat16)
        if self.bits == 8:
            return self.weight, self.weight_scale.to(torch.bfloat16), prequant
        return (*pack_int4_for_cpu(self.weight, self.weight_scale), prequant)

    def _cached(self, name: str, build):
        """build(), kept until `weight`, `weight_scale` or `prequant_scale` is replaced or written to."""
        key = [self.weight, self.weight_scale, self.prequant_scale]
        key = [(t.data_ptr(), None if t.is_inference() else t._version) for t in key if t is not None]
        hit = self._cache.get(name)
        if hit is None or hit[0] != key:
            with torch.no_grad():
                hit = self._cache[name] = (key, build())
        return hit[1]

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits} weight-only{group}"
