"""Weight-only linears, TensorRT-LLM `W8A16` and `W4A16_AWQ`: y = (x * prequant_scale) W^T, no bias.

Only W is quantized: the input is never rounded to integers, and the arithmetic is at least as precise
as x's dtype (float16 on CPU runs in float32).
- bits 8: `weight` int8 [N, K], `weight_scale` [N]; W = weight * weight_scale[:, None].
- bits 4 (ModelOpt's AWQ layout): `weight` int8 [N/2, K], byte (r, k) holds the two's-complement int4 of
  row 2r in its low nibble and of row 2r+1 in its high one; `weight_scale` [N, K/G];
  W[n, k] = int4(n, k) * weight_scale[n, k // G].
`prequant_scale` [K] (AWQ's activation scaling) is optional (`has_prequant`); without it p = 1.

CUDA: float16/bfloat16 with M <= TRITON_MAX_M runs one Triton GEMM that reads the quantized weight and
dequantizes it in registers; float32, larger M (prefill) and group sizes that cannot tile dequantize W to
x's dtype once per call and use torch's matmul. Measured on an H200 (bf16, us of GPU time per call,
CUDA-graph replay; `python -m tests.test_weight_only_linear cuda`):
  [N x K]         M | triton W4  dense W4 | triton W8  dense W8 | bf16 F.linear (unquantized)
   1536x576      1 |     4.8       23.3   |     4.0       15.8   |    3.6
   1536x576    256 |    10.4       23.3   |     6.5       15.8   |    3.6
   1536x576   4096 |    55.7       33.8   |    48.0       26.2   |   13.1
   576x1536      1 |    10.5       24.2   |     7.2       16.8   |    4.6
   14336x4096    1 |    57.6      727.8   |    26.8      619.0   |   30.2
   14336x4096  256 |   238.8      736.8   |   159.5      628.9   |   44.6
   14336x4096 1024 |   887.7      845.5   |   541.9      735.1   |  155.3
   14336x4096 4096 |  3428.9     1317.4   |  2158.4     1269.5   |  721.7
   4096x14336    1 |    85.7      727.6   |    54.8      616.3   |   31.1
The default model's linears are launch-bound at decode. On an 8B model's, the kernel beats dequantizing up to
M ~ 256-1024 and loses 2.6x at 4096, hence TRITON_MAX_M = 256; at M=1 int4 streams its weight at only
~0.5 TB/s (a serial K loop on few programs; split-K would help), slower than unquantized bf16.

CPU: us per call, threads=2, AMD EPYC (AVX512-BF16, VNNI), torch 2.13, G = 64, through the module
(`python -m tests.test_weight_only_linear cpu`); dynamic int8 is for comparison only: it quantizes x (W8A8).
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
times their M=1 time, so bfloat16 uses them for M <= CPU_PACKED_MAX_M and a cached bfloat16 dequantized
weight above that (oneDNN's bf16 GEMM is 1.1-2.5x faster there). float32 and float16 inputs use a cached
float32 dequantized weight and F.linear: no exact weight-only option beats float32 F.linear for them. So
on CPU a weight-only model gains speed only in bfloat16; in float32 it runs at float32 speed (plus ~15 us
of Python per call), with float weights cached beside the quantized ones.

Caches (CPU only; CUDA reads the buffers as they are, so CUDA graphs see no lazy work) are built on first
use and keyed on the data pointer and version counter of `weight`, `weight_scale`, `prequant_scale`, so a
later copy into them invalidates the cache. Tensors made under `torch.inference_mode` have no version
counter: after changing those in place, call `prepare()`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from llmserve.ops.triton_support import jit as _jit, tl, triton

TRITON_MAX_M = 256  # rows above which CUDA dequantizes W once and calls torch's matmul (see the table)
CPU_PACKED_MAX_M = 8  # bf16 packed kernels win up to here on CPU (measured: tie at 8, 1.4-2x slower at 16)
CPU_INT4_GROUP_SIZES = (32, 64, 128, 256)  # what `_weight_int4pack_mm_for_cpu` accepts


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
@_jit
def _weight_only_gemm_kernel(x_ptr, w_ptr, scale_ptr, prequant_ptr, y_ptr, M, N, K, K_PER_SPLIT,
                             stride_xm, stride_w, stride_scale, stride_ym, stride_split,
                             BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_PREQUANT: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # program (m tile, n tile, k split); with several splits each writes its float32 partial sum to its
    # own slice of y (stride_split apart) and the caller adds them up
    split = tl.program_id(2)
    k_start = split * K_PER_SPLIT
    k_end = tl.minimum(K, k_start + K_PER_SPLIT)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    w_rows = offs_n // (8 // BITS)  # int4: rows 2r and 2r+1 share byte row r
    nibble_shift = 28 - (offs_n % 2) * 4  # int4: moves row n's nibble to the top bits of an int32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        if HAS_PREQUANT:
            prequant = tl.load(prequant_ptr + offs_k, mask=mask_k, other=0.0)
            x = (x.to(tl.float32) * prequant[None, :]).to(y_ptr.dtype.element_ty)
        w = tl.load(w_ptr + w_rows[None, :] * stride_w + offs_k[:, None],
                    mask=mask_k[:, None] & mask_n[None, :], other=0)  # [BLOCK_K, BLOCK_N] int8
        if BITS == 4:
            w = (w.to(tl.int32) << nibble_shift[None, :]) >> 28  # arithmetic shift sign-extends
            # BLOCK_K divides GROUP_SIZE: one scale per column for the tile, applied in float32
            scale = tl.load(scale_ptr + offs_n * stride_scale + k0 // GROUP_SIZE, mask=mask_n, other=0.0)
            acc += tl.dot(x, w.to(x.dtype)) * scale[None, :]
        else:
            acc += tl.dot(x, w.to(x.dtype))  # |int8| <= 128 is exact in float16 and bfloat16
    if BITS == 8:
        acc = acc * tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    tl.store(y_ptr + split * stride_split + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def triton_block_k(bits: int, group_size: int | None) -> int | None:
    """The kernel's K tile: 128 for int8; for int4 64, or the group size when smaller, so that a tile never
    straddles two groups; None when the group size cannot tile (not a power of two >= 16)."""
    if bits == 8:
        return 128
    is_power_of_two = group_size & (group_size - 1) == 0
    return min(64, group_size) if is_power_of_two and group_size >= 16 else None


def weight_only_mm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   prequant_scale: torch.Tensor | None, bits: int, group_size: int | None) -> torch.Tensor:
    """(x * prequant_scale) W^T for contiguous x [M, K] float16/bfloat16 on CUDA, one Triton kernel."""
    num_rows, num_cols = x.shape
    out_features = weight.shape[0] * (8 // bits)
    block_m, block_n, block_k, num_warps, num_stages = _tiles(num_rows, bits, group_size)
    tiles = triton.cdiv(num_rows, block_m) * triton.cdiv(out_features, block_n)
    k_per_split = _k_per_split(num_cols, block_k, tiles, x.device) if num_rows <= 16 else num_cols
    splits = triton.cdiv(num_cols, k_per_split)
    y = torch.empty((splits, num_rows, out_features), dtype=x.dtype if splits == 1 else torch.float32, device=x.device)
    prequant = weight_scale if prequant_scale is None else prequant_scale  # not read without a prequant
    grid = (triton.cdiv(num_rows, block_m), triton.cdiv(out_features, block_n), splits)
    _weight_only_gemm_kernel[grid](
        x, weight, weight_scale, prequant, y, num_rows, out_features, num_cols, k_per_split,
        x.stride(0), weight.stride(0), weight_scale.stride(0), y.stride(1), y.stride(0),
        BITS=bits, GROUP_SIZE=group_size or 1, HAS_PREQUANT=prequant_scale is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)
    return y[0] if splits == 1 else y.sum(dim=0).to(x.dtype)


def _tiles(num_rows: int, bits: int, group_size: int | None) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), the best of small sweeps on an H200 (llama-8b linears):
    narrow tiles for decode, wider ones from 17 rows (M 64 and 256 swept)."""
    block_k = triton_block_k(bits, group_size)
    if num_rows <= 16:
        return 16, 64 if bits == 8 else 32, block_k, 4, 4
    block_m = 64 if num_rows <= 64 else 128
    if bits == 8:
        return block_m, 128, block_k, 4 if block_m == 64 else 8, 3
    return block_m, 64, block_k, 4, 3


def _k_per_split(num_cols: int, block_k: int, tiles: int, device: torch.device) -> int:
    """Decode (few rows) has too few output tiles to keep every SM streaming weights: split K so that about
    two programs per SM run, each over at least two K tiles (a multiple of block_k, so that no tile
    straddles a scale group)."""
    k_tiles = triton.cdiv(num_cols, block_k)
    splits = max(1, min(k_tiles // 2, triton.cdiv(2 * _sm_count(device), tiles)))
    return triton.cdiv(k_tiles, splits) * block_k


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
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
        if x2.dtype == torch.bfloat16 and 1 <= x2.shape[0] <= CPU_PACKED_MAX_M and self._cpu_packed_ok():
            return self._cpu_packed_mm(x2)
        dtype = torch.bfloat16 if x2.dtype == torch.bfloat16 else torch.float32  # CPU float16 GEMMs are slow
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
