"""Is the first pass of workload T in a fresh process as fast as the later ones? (CUDA)

Runs the engine's start-up warm-up, then workload T several times in one process (token ids shifted per
pass, so the prefix cache never helps) and prints, per pass: output tok/s, Triton compilations (counted
with Triton's post-compile hook), Python gc time, CUDA allocations, and decode-only vs mixed step times
with the slowest steps as (tokens, sequences, prefills). Set TRITON_CACHE_DIR to an empty folder to
measure a cold machine.

Usage:  python bench/first_pass.py --model llama-1b --passes 2 [--no-warmup]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpu  # noqa: E402
from llmserve.engine.warmup import warm_up  # noqa: E402


def count_compiles() -> list[str]:
    """Names of the Triton kernels compiled from now on (an empty list stays empty without the hook)."""
    import triton

    compiled: list[str] = []
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    if runtime is not None and hasattr(runtime, "jit_post_compile_hook"):
        runtime.jit_post_compile_hook = lambda **info: compiled.append(info["fn"].name)
    else:
        print("this Triton has no post-compile hook: compilations are not counted", file=sys.stderr)
    return compiled


def gc_seconds() -> list[float]:
    total, began = [0.0], [0.0]

    def callback(phase, _info):
        if phase == "start":
            began[0] = time.perf_counter()
        else:
            total[0] += time.perf_counter() - began[0]
    gc.callbacks.append(callback)
    return total


def timed_steps(engine) -> list[tuple[tuple[int, int, int], float]]:
    """Wrap schedule() and step() to record each step's (tokens, sequences, prefills) and seconds."""
    records, shapes = [], []
    schedule, step = engine.scheduler.schedule, engine.step

    def recording_schedule():
        out = schedule()
        counts = out.num_scheduled_tokens
        shapes.append((sum(counts.values()), len(counts), sum(1 for n in counts.values() if n > 1)))
        return out

    def timed_step():
        began = time.perf_counter()
        result = step()
        records.append((shapes[-1] if shapes else (0, 0, 0), time.perf_counter() - began))
        return result
    engine.scheduler.schedule, engine.step = recording_schedule, timed_step
    return records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-1b", choices=sorted(gpu.MODELS))
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    args = parser.parse_args()

    compiled, gc_total = count_compiles(), gc_seconds()
    engine = gpu.make_engine(gpu.model_config(args.model), max_num_seqs=256,
                             max_num_batched_tokens=args.max_num_batched_tokens, enforce_eager=False)
    print(f"engine ready; Triton compilations so far {len(compiled)}", flush=True)
    if args.warmup:
        before = len(compiled)
        print(f"warm-up {warm_up(engine.core):.1f} s, compilations {len(compiled) - before}", flush=True)
    prompts = gpu.workload_t(512)
    steps = timed_steps(engine)
    for index in range(args.passes):
        steps.clear()
        compiles0, gc0 = len(compiled), gc_total[0]
        allocs0 = torch.cuda.memory_stats().get("num_device_alloc", 0)
        run = gpu.run_engine(engine, [[t + index for t in p] for p in prompts], 256)
        decode = [s for shape, s in steps if shape[1] and not shape[2]]
        mixed = [s for shape, s in steps if shape[2]]
        print(json.dumps(dict(
            p=index, tok_s=round(run["output_tok_s"]), secs=round(run["seconds"], 2), steps=len(steps),
            compiles=len(compiled) - compiles0, compiled=sorted(set(compiled[compiles0:])),
            gc_s=round(gc_total[0] - gc0, 3),
            device_allocs=torch.cuda.memory_stats().get("num_device_alloc", 0) - allocs0,
            decode_steps=len(decode), decode_s=round(sum(decode), 2),
            decode_median_ms=round(1e3 * float(np.median(decode)), 2) if decode else None,
            mixed_steps=len(mixed), mixed_s=round(sum(mixed), 2),
            mixed_median_ms=round(1e3 * float(np.median(mixed)), 2) if mixed else None,
            slowest=[(shape, round(1e3 * s, 1)) for shape, s in sorted(steps, key=lambda r: -r[1])[:6]])),
            flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
