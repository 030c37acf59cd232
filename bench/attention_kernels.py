"""Paged-attention kernel micro-benchmark: Triton vs the torch reference vs the bandwidth floor.

Usage (on a CUDA machine):  python bench/attention_kernels.py [--json results.json] [--quick]
llama-8b attention shapes (H 32, Hkv 8, D 128, bf16, block 16). Every timed call reads another
layer's cache (enough layers to overflow L2, as a real step does), and the calls of one
measurement are replayed from a CUDA graph, so launch gaps stay out of kernel times.
Decode floor = K/V bytes read / the measured device copy bandwidth (read + write counted).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmserve.ops.attention import AttentionMetadata, paged_attention, write_kv  # noqa: E402
from llmserve.ops.triton_attention import (PrefillTiles, default_num_splits,  # noqa: E402
                                           paged_decode_attention, paged_prefill_attention, write_kv_triton)

H, HKV, D, S, DTYPE = 32, 8, 128, 16, torch.bfloat16
TOUCH_BYTES = 512 << 20  # bytes of distinct caches one measurement walks through, > 4x L2
MAX_LAYERS = 256


def time_graph(calls, repeat: int = 7) -> float:
    """Median seconds per call of `calls` (a list of thunks), replayed as one CUDA graph."""
    for call in calls:  # compile and warm up outside the capture
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(calls))
    del graph
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes per second of a 2 GiB device copy (eager: a graph turns it into a slower copy-engine node)."""
    src = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    times = []
    for i in range(12):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() * src.element_size() / statistics.median(times[2:])


def num_layers_for(bytes_per_layer: int) -> int:
    return max(2, min(MAX_LAYERS, -(-TOUCH_BYTES // bytes_per_layer)))


def make_paged(specs: list[tuple[int, int]], num_layers: int, gen: torch.Generator):
    """(q, caches [L, 2, N, S, Hkv, D], meta) for (q_len, ctx) sequences on shuffled blocks."""
    blocks_per_seq = [-(-ctx // S) for _, ctx in specs]
    num_blocks = sum(blocks_per_seq)
    ids = torch.randperm(num_blocks, generator=gen, device="cuda").to(torch.int32)
    tables = torch.zeros(len(specs), max(blocks_per_seq), dtype=torch.int32, device="cuda")
    offsets = [0]
    for b, n in enumerate(blocks_per_seq):
        tables[b, :n] = ids[offsets[-1]:offsets[-1] + n]
        offsets.append(offsets[-1] + n)
    caches = torch.randn(num_layers, 2, num_blocks, S, HKV, D, device="cuda", dtype=DTYPE, generator=gen)
    q_lens, ctxs = [q for q, _ in specs], [c for _, c in specs]
    q = torch.randn(sum(q_lens), H, D, device="cuda", dtype=DTYPE, generator=gen)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(sum(q_lens), dtype=torch.int64, device="cuda"), block_tables=tables,
        context_lens=torch.tensor(ctxs, dtype=torch.int32, device="cuda"),
        query_start_loc=torch.tensor([0] + q_lens, device="cuda").cumsum(0).to(torch.int32),
        num_decodes=sum(1 for q_len in q_lens if q_len == 1), max_context_len=max(ctxs),
        query_lens_host=q_lens, context_lens_host=ctxs)
    return q, caches, meta


def bench_decode(batch: int, ctx: int, bandwidth: float, gen, splits=(None,)) -> dict:
    kv_bytes = batch * ctx * HKV * D * 2 * DTYPE.itemsize  # K and V, read once
    layers = num_layers_for(kv_bytes)
    q, caches, meta = make_paged([(1, ctx)] * batch, layers, gen)
    out = torch.empty_like(q)
    row = dict(batch=batch, ctx=ctx, kv_mb=kv_bytes / 1e6, floor_us=kv_bytes / bandwidth * 1e6,
               default_splits=default_num_splits(batch, HKV, meta.block_tables.shape[1] * S, q.device))
    for num_splits in splits:
        calls = [lambda c=c: paged_decode_attention(q, c[0], c[1], meta.block_tables, meta.context_lens, 0.088,
                                                    out=out, num_splits=num_splits) for c in caches]
        row[f"triton_us[{num_splits or 'default'}]"] = time_graph(calls) * 1e6
    if len(splits) == 1:
        row["torch_us"] = time_graph([lambda c=c: paged_attention(q, c[0], c[1], meta, 0.088)
                                      for c in caches[:8]], repeat=3) * 1e6
    return row


def decode_row(batch: int, ctx: int, bandwidth: float, gen) -> dict:
    row = bench_decode(batch, ctx, bandwidth, gen)
    row["frac_of_floor"] = row["floor_us"] / row["triton_us[default]"]
    row["x_torch"] = row["torch_us"] / row["triton_us[default]"]
    print(" ".join(f"{k}={fmt(v)}" for k, v in row.items()), flush=True)
    torch.cuda.empty_cache()
    return row


def causal_flops(specs) -> float:
    keys_seen = sum(q_len * (ctx - q_len) + q_len * (q_len + 1) // 2 for q_len, ctx in specs)
    return 4.0 * H * D * keys_seen  # QK^T and PV, 2 flops per multiply-add


PREFILL_TILES = [PrefillTiles(128, 64, 8, 2), PrefillTiles(128, 64, 4, 2), PrefillTiles(128, 128, 8, 2),
                 PrefillTiles(128, 64, 8, 3), PrefillTiles(64, 64, 4, 2), PrefillTiles(64, 32, 4, 3)]


def short_tiles(tiles: PrefillTiles) -> str:
    return f"{tiles.block_m}x{tiles.block_n}w{tiles.num_warps}s{tiles.num_stages}"


def bench_prefill(specs, gen, tile_sweep=()) -> dict:
    kv_bytes = sum(ctx for _, ctx in specs) * HKV * D * 2 * DTYPE.itemsize
    layers = min(32, num_layers_for(kv_bytes))
    q, caches, meta = make_paged(specs, layers, gen)
    out = torch.empty_like(q)
    max_q = max(q_len for q_len, _ in specs)

    def time_tiles(tiles):
        return time_graph([lambda c=c: paged_prefill_attention(
            q, c[0], c[1], meta.block_tables, meta.query_start_loc, meta.context_lens, max_q, 0.088, out=out,
            tiles=tiles) for c in caches])

    triton_s = time_tiles(None)
    row = dict(specs=f"{len(specs)}x(q {specs[0][0]}, ctx {specs[0][1]})",
               tflops=causal_flops(specs) / triton_s / 1e12, triton_us=triton_s * 1e6)
    for tiles in tile_sweep:
        row[short_tiles(tiles)] = time_tiles(tiles) * 1e6
    if tile_sweep:
        return row
    row["torch_us"] = time_graph([lambda c=c: paged_attention(q, c[0], c[1], meta, 0.088)
                                  for c in caches[:4]], repeat=3) * 1e6
    if len(specs) == 1 and specs[0][0] == specs[0][1]:  # a contiguous flash-attention ceiling for one prompt
        row["sdpa_us"] = time_sdpa(specs[0][0], layers, gen) * 1e6
    return row


def time_sdpa(n: int, layers: int, gen) -> float:
    """torch SDPA on one contiguous causal prompt of n tokens (K/V repeated to H heads for the flash backend)."""
    qs = torch.randn(1, H, n, D, device="cuda", dtype=DTYPE, generator=gen)
    kvs = [torch.randn(2, 1, H, n, D, device="cuda", dtype=DTYPE, generator=gen) for _ in range(layers)]
    return time_graph([lambda kv=kv: F.scaled_dot_product_attention(qs, kv[0], kv[1], is_causal=True)
                       for kv in kvs])


def bench_write_kv(num_tokens: int, gen) -> dict:
    layers = 64
    caches = torch.randn(layers, 2, 1024, S, HKV, D, device="cuda", dtype=DTYPE, generator=gen)
    fused = torch.randn(num_tokens, H + 2 * HKV, D, device="cuda", dtype=DTYPE, generator=gen)
    k, v = fused[:, H:H + HKV], fused[:, H + HKV:]
    slots = torch.randperm(1024 * S, device="cuda", generator=gen)[:num_tokens]
    row = dict(tokens=num_tokens)
    for name, fn in (("index_copy_us", write_kv), ("triton_us", write_kv_triton)):
        row[name] = time_graph([lambda c=c: fn(k, v, c[0], c[1], slots) for c in caches]) * 1e6
    return row


def fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    keys = list(dict.fromkeys(k for row in rows for k in row))
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(fmt(row.get(k, "")) for k in keys))


def run_section(name: str, fn, results: dict) -> list[dict]:
    """fn() -> rows, stored under results[name]; a failure is printed, not fatal, so later sections still run."""
    try:
        results[name] = fn()
    except Exception as exc:  # noqa: BLE001 - a benchmark should report what it could measure
        print(f"{name} failed: {exc!r}", flush=True)
        results[name] = []
    return results[name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quick", action="store_true", help="decode table only")
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    bandwidth = copy_bandwidth()
    name = torch.cuda.get_device_name()
    import triton
    print(f"{name}; torch {torch.__version__}; triton {triton.__version__}; copy {bandwidth / 1e12:.2f} TB/s")
    results = dict(card=name, torch=torch.__version__, triton=triton.__version__, copy_tbps=bandwidth / 1e12)
    decode = run_section("decode", lambda: [decode_row(b, c, bandwidth, gen) for b in (1, 64, 256)
                                            for c in (128, 512, 1024, 2048, 4096)], results)
    if not args.quick:
        sweep = run_section("split_sweep", lambda: [
            bench_decode(b, c, bandwidth, gen, splits=(1, 2, 4, 8, 16, 32, 64))
            for b, c in ((1, 1024), (1, 4096), (8, 4096), (64, 1024), (64, 4096))], results)
        prefill = run_section("prefill", lambda: [bench_prefill(specs, gen) for specs in (
            [(1024, 1024)], [(4096, 4096)], [(512, 512)] * 8, [(256, 1280)] * 4, [(16, 2000)] * 8)], results)
        tiles = run_section("prefill_tiles", lambda: [bench_prefill(specs, gen, PREFILL_TILES) for specs in (
            [(1024, 1024)], [(4096, 4096)], [(256, 1280)] * 4, [(16, 2000)] * 8)], results)
        writes = run_section("write_kv", lambda: [bench_write_kv(t, gen) for t in (1, 64, 256, 2048)], results)
        print_table("decode split sweep (us per call; columns = num_splits)", sweep)
        print_table("prefill (bf16; us per layer call; sdpa = contiguous flash ceiling)", prefill)
        print_table("prefill tile sweep (us per layer call; triton_us = default tiles)", tiles)
        print_table("write_kv (us per layer call, K and V)", writes)
    print_table(f"decode, llama-8b shapes, {name} (us per layer call; floor = K/V bytes / copy bandwidth)", decode)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
