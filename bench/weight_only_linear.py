"""Times the weight-only linears' paths per call (the tables in llmserve/ops/weight_only_linear.py):

    python bench/weight_only_linear.py cpu    # threads=2: float32 F.linear, dynamic int8, W4/W8 in bf16 and fp32
    python bench/weight_only_linear.py cuda   # CUDA-graph replay: Triton W4/W8, dequantize-then-matmul, bf16
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llmserve.ops.weight_only_linear import weight_only_mm  # noqa: E402
from tests.test_weight_only_linear import make_linear  # noqa: E402

SHAPES = [(1536, 576), (576, 1536), (960, 576), (3072, 576)]  # the default model's linears, [N x K]
CUDA_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # llama-8b's: qkv, o, gate_up, down


def _time_us(fn, budget_s: float = 0.3) -> float:
    """CPU: best of 3 means over ~budget_s, in microseconds per call."""
    fn()
    start = time.perf_counter()
    fn()
    calls = max(3, int(budget_s / max(time.perf_counter() - start, 1e-6)))
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def _dynamic_int8(weight: torch.Tensor) -> torch.nn.Module:
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data = weight
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear}, torch.qint8)


def bench_cpu() -> None:
    """us per call at threads=2: float32 F.linear, dynamic int8 (W8A8) and the module's paths."""
    torch.set_num_threads(2)
    print("[N x K]  M | fp32 F.linear  dyn int8 | W4 bf16  W8 bf16 | W4 fp32  W8 fp32")
    for n, k in SHAPES:
        w4, w8 = make_linear(k, n, 4, 64), make_linear(k, n, 8, None)
        dense = w8.dense_weight(torch.float32)
        dynamic = _dynamic_int8(dense)
        for m in (1, 16):
            x = torch.randn(m, k)
            xb = x.bfloat16()
            times = [_time_us(lambda: fn(a)) for fn, a in ((lambda t: F.linear(t, dense), x), (dynamic, x),
                                                                  (w4, xb), (w8, xb), (w4, x), (w8, x))]
            print(f"{n}x{k} {m:2d} | " + " ".join(f"{t:8.0f}" for t in times))


def _cuda_graph_us(fn, calls: int = 20, replays: int = 10) -> float:
    """GPU time per call in microseconds: `calls` calls captured in one CUDA graph (no launch overhead)."""
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        fn()  # compiles, and warms up off the capture stream
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (calls * replays)


def bench_cuda() -> None:
    """us per call on CUDA, bf16, int4 in groups of 128: the Triton kernels, dequantize-then-matmul, and a
    plain bf16 F.linear."""
    print("[N x K]        M | triton W4  dense W4 | triton W8  dense W8 | bf16 F.linear")
    for n, k in SHAPES + CUDA_SHAPES:
        w4, w8 = make_linear(k, n, 4, 128, device="cuda"), make_linear(k, n, 8, None, device="cuda")
        dense = w8.dense_weight(torch.bfloat16)
        for m in (1, 16, 64, 256, 1024, 4096):
            x = torch.randn(m, k, device="cuda").bfloat16()
            runs = [lambda: weight_only_mm(x, w4.weight, w4.weight_scale, w4.prequant_scale, 4, 128),
                    lambda: F.linear(x, w4.dense_weight(x.dtype)),
                    lambda: weight_only_mm(x, w8.weight, w8.weight_scale, w8.prequant_scale, 8, None),
                    lambda: F.linear(x, w8.dense_weight(x.dtype)), lambda: F.linear(x, dense)]
            print(f"{n:5d}x{k:<5d} {m:5d} | " + " ".join(f"{_cuda_graph_us(run):9.1f}" for run in runs))


if __name__ == "__main__":
    bench_cuda() if sys.argv[1:] == ["cuda"] else bench_cpu()
