"""Where one engine step's time goes: per-phase wall time over a decode-heavy run (CUDA).

Usage: python bench/profile_step.py --model llama-1b --num-requests 256 --output-len 64
Phases: schedule (the plain-data SchedulerOutput), prepare_inputs (the runner's request
states, host tensors + copies), forward (launch; CUDA graph replay when eligible), logits +
sample (device), to-host (the one sync: waits for the GPU), advance/resolve (scheduler
bookkeeping), core outputs (EngineCoreOutputs), detokenize (the output processor's deltas).
With async scheduling (the CUDA default) to-host is the time the host waits for the device.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu  # noqa: E402  (bench/gpu.py: model shapes, engine factory, workloads)

from llmserve.worker import model_runner  # noqa: E402
from llmserve.sampling_params import SamplingParams  # noqa: E402

TIMES: dict[str, float] = defaultdict(float)


def timed(name, fn, sync=False):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        if sync:
            torch.cuda.synchronize()
        TIMES[name] += time.perf_counter() - start
        return result
    return wrapper


def instrument(engine, sync: bool) -> None:
    runner = engine.runner
    engine.scheduler.schedule = timed("schedule", engine.scheduler.schedule)
    engine.scheduler.advance = timed("advance", engine.scheduler.advance)
    engine.scheduler.resolve = timed("resolve", engine.scheduler.resolve)
    runner.prepare_inputs = timed("prepare_inputs", runner.prepare_inputs, sync)
    runner._forward = timed("forward", runner._forward, sync)
    runner.sampler.__class__.__call__ = timed("sample", runner.sampler.__class__.__call__, sync)
    model_runner._finish_copy = timed("to_host", model_runner._finish_copy)
    engine.core._outputs = timed("core_outputs", engine.core._outputs)
    engine.processor.process = timed("detokenize", engine.processor.process)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama-1b")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--sync", action="store_true", help="synchronize after each phase (attributes GPU time)")
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None)
    args = parser.parse_args()
    cfg = gpu.model_config(args.model)
    engine = gpu.make_engine(cfg, max_num_seqs=256, max_num_batched_tokens=8192, enforce_eager=False,
                             async_scheduling=args.async_scheduling)
    prompts = gpu.workload_t(args.num_requests)
    gpu.run_engine(engine, prompts[:4], 4)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"p{i}", p, params)
    while engine.scheduler.waiting or any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running):
        engine.step()
    instrument(engine, args.sync)
    torch.cuda.synchronize()
    start, steps = time.perf_counter(), 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    total = time.perf_counter() - start
    print(f"{args.model}: {steps} decode steps of ~{args.num_requests} seqs, {1e3 * total / steps:.2f} ms/step "
          f"(sync after phases: {args.sync}, async scheduling: {engine.async_scheduling})")
    for name, seconds in sorted(TIMES.items(), key=lambda kv: -kv[1]):
        print(f"  {name:15s} {1e3 * seconds / steps:7.3f} ms/step")


if __name__ == "__main__":
    main()
