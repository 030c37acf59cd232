"""What structured outputs cost: one batch with and without a JSON schema on half of its requests.

Usage:
  CPU (the default model):         python bench/structured.py --out FILE
  CUDA (llama-1b shape, random):   python bench/structured.py --model llama-1b --tokenizer DIR --out FILE

Each repeat runs the same N chat prompts as one batch twice (greedy): "half-json", where every other
request carries one of five JSON schemas (nested objects, arrays, enums, bounded numbers, strings)
and ends when its JSON is complete, and "free", the same requests with no schema, each held to the
exact number of tokens its constrained twin generated (EOS ignored). Same batch, same lengths: the
difference is the grammar's cost (masks, matcher updates, the wait for the previous step's tokens
before sampling). Reports output tokens/s of each and their ratio (median over repeats). llama-1b
runs random weights (bench/gpu.py's shape) over a real tokenizer's vocabulary: the masks are
computed over real token strings, the text is noise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmserve.sampling_params import SamplingParams, StructuredOutputs  # noqa: E402

def _object(properties: dict) -> dict:
    return {"type": "object", "additionalProperties": False, "required": list(properties), "properties": properties}


SCHEMAS = [
    _object({"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    _object({"items": {"type": "array", "minItems": 1, "maxItems": 3, "items": _object(
        {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"}, "qty": {"type": "integer", "minimum": 1,
                                                                           "maximum": 9}})},
             "express": {"type": "boolean"}}),
    _object({"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]},
             "temperature": {"type": "number", "minimum": -60, "maximum": 60}}),
    _object({"user": _object({"id": {"type": "integer", "minimum": 1, "maximum": 99999},
                              "roles": {"type": "array", "maxItems": 3, "items": {"enum": ["admin", "dev", "ops"]}}}),
             "active": {"type": "boolean"}}),
    _object({"title": {"type": "string", "maxLength": 40}, "body": {"type": "string", "maxLength": 600},
             "tags": {"type": "array", "maxItems": 3, "items": {"enum": ["news", "sport", "tech", "art"]}}}),
]
ASKS = ["Describe a person.", "Place an order.", "What is the weather in Paris?", "Create a user account.",
        "Write a short article."]


def build_engine(args):
    from llmserve.engine.engine import Engine

    if args.model == "default":
        from llmserve.config import EngineConfig, SchedulerConfig

        config = EngineConfig(model="default", scheduler=SchedulerConfig(max_num_seqs=args.num_requests))
        return Engine.from_config(config, progress=lambda message: None)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import gpu  # bench/gpu.py: the llama-1b / llama-8b shapes with random weights

    # the core reads the tokenizer for the grammars; the engine itself stays without one (no detokenizing of
    # ids beyond the tokenizer's vocabulary, which llama-1b's random weights do sample)
    return gpu.make_engine(gpu.model_config(args.model), max_num_seqs=args.num_requests, max_num_batched_tokens=8192,
                           enforce_eager=False, tokenizer_path=args.tokenizer)


def prompts_for(engine, count: int, tokenizer_path: str | None) -> list[list[int]]:
    from llmserve.frontend.tokenizer import load_tokenizer

    tokenizer = engine.tokenizer or load_tokenizer(tokenizer_path)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": ASKS[i % len(ASKS)]}], tokenize=False,
                                           add_generation_prompt=True) for i in range(count)]
    return [tokenizer.encode(text, add_special_tokens=False) for text in texts]


def run_batch(engine, prompts: list[list[int]], params: list[SamplingParams]) -> dict:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    ids = [f"s{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
    for request_id, prompt, p in zip(ids, prompts, params):
        engine.add_request(request_id, prompt, p)
    lengths = dict.fromkeys(ids, 0)
    steps = 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            lengths[output.request_id] += len(output.new_token_ids)
        steps += 1
    sync()
    elapsed = time.perf_counter() - start
    generated = sum(lengths.values())
    return {"seconds": elapsed, "output_tokens": generated, "steps": steps, "output_tok_s": generated / elapsed,
            "lengths": [lengths[i] for i in ids]}


def constrained_params(count: int, max_tokens: int) -> list[SamplingParams]:
    """Every other request carries a schema (in turn); the others are free, up to max_tokens."""
    return [SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=i % 2 == 1,
                           structured_outputs=StructuredOutputs("json", json.dumps(SCHEMAS[i // 2 % len(SCHEMAS)]))
                           if i % 2 == 0 else None) for i in range(count)]


def free_twins(lengths: list[int]) -> list[SamplingParams]:
    """The same requests without schemas, each generating exactly as many tokens as its twin did."""
    return [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default", help="default (CPU, the real model) or llama-1b (CUDA)")
    parser.add_argument("--tokenizer", help="a tokenizer folder (needed for llama-1b)")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128, help="of the free half of the constrained run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="write the report here (JSON)")
    args = parser.parse_args()
    engine = build_engine(args)
    prompts = prompts_for(engine, args.num_requests, args.tokenizer)
    run_batch(engine, prompts[:4], constrained_params(4, 8))  # warm-up: kernels, the grammar's tokenizer, threads
    runs = {"free": [], "half-json": []}
    for _ in range(args.repeats):
        constrained = run_batch(engine, prompts, constrained_params(len(prompts), args.max_tokens))
        runs["half-json"].append(constrained)
        runs["free"].append(run_batch(engine, prompts, free_twins(constrained["lengths"])))
        assert runs["free"][-1]["lengths"] == constrained["lengths"]
    free = statistics.median(r["output_tok_s"] for r in runs["free"])
    constrained = statistics.median(r["output_tok_s"] for r in runs["half-json"])
    lengths = runs["half-json"][0]["lengths"]
    for r in runs["free"] + runs["half-json"]:
        del r["lengths"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'x86_64'}, " \
                                                                            f"{torch.get_num_threads()} threads)"
    report = {"date": datetime.date.today().isoformat(), "device": device, "model": args.model,
              "command": " ".join(sys.argv), "num_requests": args.num_requests, "max_tokens": args.max_tokens,
              "mean_constrained_length": statistics.mean(lengths[0::2]),
              "runs": runs, "free_output_tok_s": free, "half_json_output_tok_s": constrained,
              "ratio": constrained / free}
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
