"""Offline throughput of tensor/pipeline splits on CPU (gloo), same prompts, one process per rank.

Usage:  python bench/cpu_parallel.py --splits 1x1,1x2:1,1x2,3x1 [--model default] [--num-prompts 32]
        [--prompt-len 128] [--output-len 64]
Each split (TPxPP, ":D" for D steps in flight; default one per stage, 1 = no pipeline overlap) loads the
model afresh, runs the same random-token prompts greedily with
ignore_eos, and reports output tokens per second and the ratio to the first split.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmserve.llm import LLM  # noqa: E402
from llmserve.sampling_params import SamplingParams  # noqa: E402


def run(model: str, tp: int, pp: int, depth: int | None, prompts: list[list[int]], output_len: int) -> dict:
    from llmserve.config import EngineConfig, ParallelConfig, SchedulerConfig
    from llmserve.engine.engine import Engine

    config = EngineConfig(model=model, scheduler=SchedulerConfig(max_num_seqs=len(prompts)),
                          parallel=ParallelConfig(tp, pp, pipeline_depth=depth))
    with LLM(engine=Engine.from_config(config, progress=lambda message: None)) as llm:
        params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
        llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))  # warm-up
        began = time.perf_counter()
        results = llm.generate([[t + 1 for t in p] for p in prompts], params)
        seconds = time.perf_counter() - began
    tokens = sum(len(r.outputs[0].token_ids) for r in results)
    return {"tp": tp, "pp": pp, "steps_in_flight": depth or pp, "seconds": round(seconds, 2), "output_tokens": tokens,
            "output_tok_s": round(tokens / seconds, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--splits", default="1x1,1x2")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, 30000, size=args.prompt_len).tolist() for _ in range(args.num_prompts)]
    rows = []
    for split in args.splits.split(","):
        shape, _, depth = split.partition(":")
        tp, pp = map(int, shape.split("x"))
        rows.append(run(args.model, tp, pp, int(depth) if depth else None, prompts, args.output_len))
        rows[-1]["ratio_to_first"] = round(rows[-1]["output_tok_s"] / rows[0]["output_tok_s"], 2)
        print(json.dumps(rows[-1]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
