"""Weight-only linears (W8A16, W4A16_AWQ): the int4 packing, CPU and CUDA forwards against float64, caches.

`python bench/weight_only_linear.py [cpu|cuda]` times the paths (the numbers in the module's docstring).
"""

from __future__ import annotations

import os

import pytest
import torch

from llmserve.ops import weight_only_linear
from llmserve.ops.weight_only_linear import (TRITON_MAX_M, GemmTiles, WeightOnlyLinear, cpu_compute_dtype,
                                             dequantize, pack_int4, pack_int4_for_cpu, unpack_int4, weight_only_mm)

HAS_CUDA = torch.cuda.is_available()
INTERPRET = weight_only_linear.triton is not None and os.environ.get("TRITON_INTERPRET") == "1"
# the Triton kernels run on CUDA, and on CPU tensors under the interpreter (TRITON_INTERPRET=1, float16 only)
KERNEL_DEVICES = ([pytest.param("cuda", marks=pytest.mark.gpu)] if HAS_CUDA else []) + (["cpu"] if INTERPRET else [])
SCHEMES = [(8, None), (4, 32), (4, 64)]  # (bits, group_size)
# ||y - y_ref|| / ||y_ref|| against float64. float32 computes in float32 (~1e-7 seen). A 16-bit path rounds
# x * prequant, the scale (CPU bf16 kernels) and y once each, ~2^-9 (bf16) or 2^-12 (fp16) apiece: ~3e-3
# and ~2e-4 seen, bounds with about 3x headroom.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def cpu_tolerance(dtype: torch.dtype) -> float:
    """On CPU every input computes in `cpu_compute_dtype()` (bf16 where the CPU has bf16 units)."""
    compute = cpu_compute_dtype()
    return TOLERANCE[torch.bfloat16] if torch.bfloat16 in (compute, dtype) else TOLERANCE[torch.float32]


def make_linear(in_features: int = 256, out_features: int = 96, bits: int = 4, group_size: int | None = 64,
                seed: int = 0, device: str = "cpu", **kwargs) -> WeightOnlyLinear:
    """A linear with random full-range quantized values, scales in [0.5, 1.5) and a prequant in [0.5, 2)."""
    linear = WeightOnlyLinear(in_features, out_features, bits, group_size, **kwargs)
    fill_random(linear, seed)
    return linear.to(device)


def fill_random(linear: WeightOnlyLinear, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    low, high = (-128, 128) if linear.bits == 8 else (-8, 8)
    values = torch.randint(low, high, (linear.out_features, linear.in_features), generator=generator, dtype=torch.int8)
    with torch.no_grad():
        linear.weight.copy_(values if linear.bits == 8 else pack_int4(values))
        linear.weight_scale.copy_(torch.rand(linear.weight_scale.shape, generator=generator) + 0.5)
        if linear.prequant_scale is not None:
            linear.prequant_scale.copy_(torch.rand(linear.in_features, generator=generator) * 1.5 + 0.5)


def reference(linear: WeightOnlyLinear, x: torch.Tensor) -> torch.Tensor:
    """(x * prequant) W^T in float64, on the CPU."""
    weight = dequantize(linear.weight.cpu(), linear.weight_scale.cpu(), linear.bits, linear.group_size).double()
    x = x.cpu().double()
    if linear.prequant_scale is not None:
        x = x * linear.prequant_scale.cpu().double()
    return x @ weight.t()


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.cpu().double() - want).norm() / want.norm()).item()


# ---- the format -----------------------------------------------------------------------------
def test_pack_unpack_round_trip_is_exact():
    values = torch.randint(-8, 8, (64, 40), generator=torch.Generator().manual_seed(1), dtype=torch.int8)
    values[0, 0], values[1, 0] = -8, 7
    packed = pack_int4(values)
    assert packed.dtype == torch.int8 and packed.shape == (32, 40)
    assert torch.equal(unpack_int4(packed), values)


def test_pack_puts_even_rows_in_the_low_nibble():
    values = torch.tensor([[1, -8], [-1, 7]], dtype=torch.int8)  # rows 0 and 1
    # column 0: low 0x1, high 0xF -> 0xF1; column 1: low 0x8, high 0x7 -> 0x78
    assert pack_int4(values).view(torch.uint8).tolist() == [[0xF1, 0x78]]


def test_dequantize_applies_channel_and_group_scales():
    int8 = dequantize(torch.tensor([[2, -3], [127, -128]], dtype=torch.int8), torch.tensor([0.5, 2.0]), 8, None)
    assert int8.tolist() == [[1.0, -1.5], [254.0, -256.0]]
    values = torch.tensor([[1, 2, 3, 4], [-8, 7, -1, 0]], dtype=torch.int8)
    int4 = dequantize(pack_int4(values), torch.tensor([[1.0, 10.0], [0.5, 2.0]]), 4, 2)
    assert int4.tolist() == [[1.0, 2.0, 30.0, 40.0], [-4.0, 3.5, -2.0, 0.0]]


def test_the_cpu_int4_kernel_is_symmetric_dequantize():
    linear = make_linear(bits=4, group_size=32)
    packed, scales_and_zeros = pack_int4_for_cpu(linear.weight, linear.weight_scale)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(2)).bfloat16()
    got = torch._weight_int4pack_mm_for_cpu(x, packed, 32, scales_and_zeros)
    bf16_scale = linear.weight_scale.bfloat16().float()  # the kernel takes bfloat16 scales
    want = x.double() @ dequantize(linear.weight, bf16_scale, 4, 32).double().t()
    assert relative_error(got, want) < 1e-2


def test_state_dict_holds_the_checkpoint_names_shapes_and_dtypes():
    int4 = WeightOnlyLinear(256, 96, 4, 64).state_dict()
    assert {name: (tuple(t.shape), t.dtype) for name, t in int4.items()} == {
        "weight": ((48, 256), torch.int8), "weight_scale": ((96, 4), torch.float32),
        "prequant_scale": ((256,), torch.float32)}
    int8 = WeightOnlyLinear(256, 96, 8, has_prequant=False).state_dict()
    assert {name: (tuple(t.shape), t.dtype) for name, t in int8.items()} == {
        "weight": ((96, 256), torch.int8), "weight_scale": ((96,), torch.float32)}


@pytest.mark.parametrize("args, message", [
    ((256, 96, 3, None), "bits must be 4 or 8"),
    ((256, 96, 8, 64), "group_size must be None"),
    ((256, 96, 4, None), "group_size dividing"),
    ((256, 96, 4, 48), "group_size dividing"),
    ((256, 96, 4, 0), "group_size dividing"),
    ((256, 95, 4, 64), "out_features must be even"),
    ((0, 96, 8, None), "features must be positive"),
])
def test_bad_constructor_arguments_raise(args, message):
    with pytest.raises(ValueError, match=message):
        WeightOnlyLinear(*args)


# ---- CPU ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits, group_size", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("rows", [1, 5, 33])  # bf16: 1 and 5 take the packed kernels, 33 the dense weight
def test_cpu_forward_matches_float64(bits, group_size, dtype, rows):
    linear = make_linear(bits=bits, group_size=group_size)
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(3)).to(dtype)
    y = linear(x)
    assert y.dtype == dtype and y.shape == (rows, 96)
    assert relative_error(y, reference(linear, x)) < cpu_tolerance(dtype)


@pytest.mark.parametrize("bits, group_size", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cpu_forward_keeps_leading_dims(bits, group_size, dtype):
    linear = make_linear(bits=bits, group_size=group_size)
    x = torch.randn(2, 3, 256, generator=torch.Generator().manual_seed(4)).to(dtype)
    y = linear(x)
    assert y.dtype == dtype and y.shape == (2, 3, 96)
    assert relative_error(y, reference(linear, x.reshape(6, 256)).reshape(2, 3, 96)) < cpu_tolerance(dtype)


@pytest.mark.parametrize("in_features, out_features, bits, group_size", [(40, 50, 8, None), (96, 50, 4, 16)])
def test_shapes_the_packed_kernels_refuse_use_the_dense_weight(in_features, out_features, bits, group_size):
    linear = make_linear(in_features, out_features, bits, group_size)
    x = torch.randn(1, in_features, generator=torch.Generator().manual_seed(5)).bfloat16()
    assert relative_error(linear(x), reference(linear, x)) < cpu_tolerance(torch.bfloat16)
    assert list(linear._cache) == [f"dense-{cpu_compute_dtype()}"]


@pytest.mark.parametrize("bits, group_size", SCHEMES)
def test_without_prequant_the_input_is_used_as_is(bits, group_size):
    linear = make_linear(bits=bits, group_size=group_size, has_prequant=False)
    assert linear.prequant_scale is None
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 256, generator=torch.Generator().manual_seed(6)).to(dtype)
        assert relative_error(linear(x), reference(linear, x)) < cpu_tolerance(dtype)


# ---- caches ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bits, group_size", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("buffer", ["weight", "weight_scale", "prequant_scale"])
def test_copying_new_values_after_a_forward_invalidates_the_cache(bits, group_size, dtype, buffer):
    linear = make_linear(bits=bits, group_size=group_size)
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(7)).to(dtype)
    before = linear(x)
    with torch.inference_mode():  # as the model runner calls it; copies still bump the version
        getattr(linear, buffer).copy_(getattr(make_linear(bits=bits, group_size=group_size, seed=8), buffer))
        after = linear(x)
    assert relative_error(after, reference(linear, x)) < cpu_tolerance(dtype)
    assert relative_error(before, reference(linear, x)) > 0.1


def test_loading_a_state_dict_invalidates_the_cache():
    linear, other = make_linear(), make_linear(seed=9)
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(10)).bfloat16()
    linear(x)
    linear.load_state_dict(other.state_dict())
    assert torch.equal(linear(x), other(x))


def test_prepare_drops_caches_of_inference_tensors():
    with torch.inference_mode():  # buffers made here carry no version counter
        linear = make_linear()
        x = torch.randn(1, 256, generator=torch.Generator().manual_seed(11)).bfloat16()
        linear(x)
        fill_random(linear, seed=12)
        linear.prepare()
        assert relative_error(linear(x), reference(linear, x)) < cpu_tolerance(torch.bfloat16)


# ---- CUDA -----------------------------------------------------------------------------------
CUDA_SCHEMES = [(8, None, 200), (4, 32, 256), (4, 64, 256), (4, 128, 256)]  # (bits, group, in): K=200 masks K


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA (the Triton kernel)")
@pytest.mark.parametrize("bits, group_size, in_features", CUDA_SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("rows", [1, 16, 300])
def test_cuda_forward_matches_float64(bits, group_size, in_features, dtype, rows):
    linear = make_linear(in_features, 96, bits, group_size, device="cuda")  # N=96: partial N tiles
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(13)).to(dtype).cuda()
    y = linear(x)
    assert y.dtype == dtype and y.shape == (rows, 96)
    assert relative_error(y, reference(linear, x)) < TOLERANCE[dtype]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA (the Triton kernel)")
@pytest.mark.parametrize("bits, group_size, in_features", CUDA_SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("has_prequant", [True, False])
@pytest.mark.parametrize("rows", [1, 16, 17, TRITON_MAX_M + 44])  # the kernel itself past the dense threshold
def test_the_triton_kernel_matches_float64(bits, group_size, in_features, dtype, has_prequant, rows):
    linear = make_linear(in_features, 96, bits, group_size, device="cuda", has_prequant=has_prequant)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(14)).to(dtype).cuda()
    y = weight_only_mm(x, linear.weight, linear.weight_scale, linear.prequant_scale, bits, group_size)
    assert relative_error(y, reference(linear, x)) < TOLERANCE[dtype]


# the decode tiles with BLOCK_K below and at the int4 groups, and a narrow one that splits K many ways
KERNEL_TILES = [GemmTiles(16, 64, 32, 4, 3), GemmTiles(16, 16, 32, 2, 2), GemmTiles(32, 64, 32, 4, 4)]


@pytest.mark.skipif(not KERNEL_DEVICES, reason="needs CUDA, or triton with TRITON_INTERPRET=1")
@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("bits, group_size, in_features", CUDA_SCHEMES)
@pytest.mark.parametrize("tiles", KERNEL_TILES, ids=lambda t: f"m{t.block_m}r{t.block_r}k{t.block_k}")
@pytest.mark.parametrize("rows", [1, 3, 16, 17])  # up to 16 split K, 17 does not
def test_the_triton_kernel_matches_float64_with_any_tiles(device, bits, group_size, in_features, tiles, rows):
    linear = make_linear(in_features, 96, bits, group_size, device=device)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(16)).half().to(device)
    y = weight_only_mm(x, linear.weight, linear.weight_scale, linear.prequant_scale, bits, group_size, tiles)
    assert y.dtype == torch.float16 and y.shape == (rows, 96)
    assert relative_error(y, reference(linear, x)) < TOLERANCE[torch.float16]


@pytest.mark.skipif(not KERNEL_DEVICES, reason="needs CUDA, or triton with TRITON_INTERPRET=1")
@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("rows", [1, 16, 17])  # the default decode tiles (int4 BLOCK_K = group = 128), then not
def test_the_default_tiles_match_float64_without_prequant(device, rows):
    for bits, group_size in ((8, None), (4, 128)):
        linear = make_linear(512, 160, bits, group_size, device=device, has_prequant=False)
        x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(17)).half().to(device)
        y = weight_only_mm(x, linear.weight, linear.weight_scale, None, bits, group_size)
        assert relative_error(y, reference(linear, x)) < TOLERANCE[torch.float16]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("bits, group_size", SCHEMES)
def test_cuda_float32_and_a_3d_input(bits, group_size):
    linear = make_linear(bits=bits, group_size=group_size, device="cuda")
    x = torch.randn(2, 3, 256, generator=torch.Generator().manual_seed(15)).cuda()
    y = linear(x)
    assert y.dtype == torch.float32 and y.shape == (2, 3, 96)
    assert relative_error(y, reference(linear, x.reshape(6, 256)).reshape(2, 3, 96)) < TOLERANCE[torch.float32]
