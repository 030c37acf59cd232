"""CPU offline benchmark: llmserve's engine vs HuggingFace `generate`, workload C prompts.

Usage: python bench/cpu_offline.py [--num-prompts 16] [--max-tokens 128] [--quantization int8]
Same model (the default SmolLM2-135M-Instruct), same chat-templated prompts, greedy, forced
lengths (EOS ignored). llmserve gets all prompts at once (in-flight batching); HF runs them
one at a time (its plain `generate`, the way a simple server would) and, as a second peer,
in static padded batches of `--hf-batch`. Prints tokens/s of each and the ratios; progress lines with
the elapsed time go to stderr.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmserve.bench.datasets import workload_c_prompts  # noqa: E402
from llmserve.checkpoint.pull import resolve_model  # noqa: E402
from llmserve.llm import LLM  # noqa: E402
from llmserve.sampling_params import SamplingParams  # noqa: E402


def chat_prompts(tokenizer, count: int) -> list[list[int]]:
    prompts = []
    for item in workload_c_prompts()[:count]:
        text = tokenizer.apply_chat_template([{"role": "user", "content": item.prompt}], tokenize=False,
                                             add_generation_prompt=True)
        prompts.append(tokenizer.encode(text, add_special_tokens=False))
    return prompts


def run_llmserve(llm: LLM, prompts: list[list[int]], max_tokens: int) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    results = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    assert all(len(r.outputs[0].token_ids) == max_tokens for r in results)
    return elapsed


class Progress:
    """Lines on stderr with the time since the start: the whole run takes minutes and prints its result last."""

    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.start:7.1f} s] {message}", file=sys.stderr, flush=True)


def run_hf(model, prompts: list[list[int]], max_tokens: int, batch: int, say: Progress) -> float:
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        last = min(i + batch, len(prompts))
        say(f"HF generate, batches of {batch}: prompt{f's {i + 1}-' if last > i + 1 else ' '}{last} of {len(prompts)}")
        chunk = prompts[i:i + batch]
        width = max(map(len, chunk))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                           do_sample=False, pad_token_id=0)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--hf-batch", type=int, default=16)
    parser.add_argument("--quantization", default=None, choices=[None, "int8"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    say = Progress()
    say("loading the default model into llmserve" + (f" ({args.quantization})" if args.quantization else ""))
    path = resolve_model("default")
    llm = LLM(str(path), max_num_seqs=args.num_prompts) if not args.quantization else LLM(
        engine=_quantized_engine(path, args.num_prompts))
    prompts = chat_prompts(llm.tokenizer, args.num_prompts)
    say("loading the same model into HuggingFace transformers")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    say("llmserve warm-up")
    run_llmserve(llm, prompts[:2], 4)
    total_out = args.num_prompts * args.max_tokens
    say(f"llmserve: {args.num_prompts} prompts x {args.max_tokens} tokens, all at once")
    ours = run_llmserve(llm, prompts, args.max_tokens)
    say(f"llmserve: {total_out / ours:.1f} tok/s")
    hf_single = run_hf(hf, prompts, args.max_tokens, 1, say)
    say(f"HF generate one at a time: {total_out / hf_single:.1f} tok/s")
    hf_batched = run_hf(hf, prompts, args.max_tokens, args.hf_batch, say)
    say(f"HF generate in batches of {args.hf_batch}: {total_out / hf_batched:.1f} tok/s")
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.processor() or
              platform.machine(), "threads": torch.get_num_threads(), "command": " ".join(sys.argv),
              "num_prompts": args.num_prompts, "prompt_tokens": sum(map(len, prompts)), "max_tokens": args.max_tokens,
              "quantization": args.quantization, "llmserve_tok_s": total_out / ours,
              "hf_generate_tok_s": total_out / hf_single, "hf_generate_batched_tok_s": total_out / hf_batched}
    print(json.dumps(result, indent=1))
    print(f"llmserve {result['llmserve_tok_s']:.1f} tok/s | HF generate one at a time "
          f"{result['hf_generate_tok_s']:.1f} (x{hf_single / ours:.2f}) | HF generate static batch of "
          f"{args.hf_batch} {result['hf_generate_batched_tok_s']:.1f} (x{hf_batched / ours:.2f})")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


def _quantized_engine(path, max_num_seqs: int):
    from llmserve.config import DeviceConfig, EngineConfig, SchedulerConfig
    from llmserve.engine.engine import Engine

    return Engine.from_config(EngineConfig(model=str(path), scheduler=SchedulerConfig(max_num_seqs=max_num_seqs),
                                           device=DeviceConfig("cpu", "float32", quantization="int8")))


if __name__ == "__main__":
    main()
