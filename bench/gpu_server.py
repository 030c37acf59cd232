"""Workload E: workload T through `llmserve serve` + `llmserve bench serve`, against the offline engine.

Usage (on a CUDA machine):
    python bench/gpu_server.py --model llama-1b --tokenizer DIR --out bench/results/e.json

One run, one card: writes a random-weight bf16 checkpoint of the model's shape with the given tokenizer
(SmolLM2's is enough: the prompts are token ids below 30,000), measures the offline `LLM.generate` on
workload T in a fresh process (after the same warm-up the server gets; run twice, the faster one is the
reference), then a fresh `llmserve serve` on the same checkpoint driven by
`llmserve bench serve --endpoint completions --dataset random` at each concurrency. Every server run is a
fresh server, so no prompt is ever served from the prefix cache of an earlier run. Workloads:
bench/workloads.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {  # bench/workloads.md: the llama-1b and llama-8b shapes; `tiny` to try the script on a CPU
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=49152, tie_word_embeddings=True, rope_theta=10000.0),
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "llama-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "generation_config.json")
OFFLINE = """
import json, sys, time
import numpy as np
from llmserve import LLM, SamplingParams
path, num, max_seqs, device, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
rng = np.random.default_rng(0)
lengths = rng.integers(256, 1024, size=num, endpoint=True)
prompts = [rng.integers(100, 30000, size=int(n)).tolist() for n in lengths]
llm = LLM(path, device=device, dtype="bfloat16" if device == "cuda" else "float32", max_num_seqs=max_seqs,
          max_model_len=4096, max_num_batched_tokens=chunk)
# the warm-up the server gets from the bench: 48 prompts of seed 99, 32 tokens each
warm = np.random.default_rng(99)
warm_lengths = warm.integers(256, 1024, size=48, endpoint=True)
llm.generate([warm.integers(100, 30000, size=int(n)).tolist() for n in warm_lengths],
             SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True))
params = SamplingParams(temperature=0.0, max_tokens=256, ignore_eos=True)
runs = []
for shift in (0, 1):  # twice, on prompts the prefix cache has not seen (the ids shifted by one the second time)
    start = time.perf_counter()
    outs = llm.generate([[t + shift for t in p] for p in prompts], params)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    runs.append({"seconds": seconds, "output_tokens": tokens, "output_tok_s": tokens / seconds})
best = max(runs, key=lambda r: r["output_tok_s"])
print("RESULT " + json.dumps({**best, "runs": runs}))
"""


def write_checkpoint(shape: dict, tokenizer_dir: Path, out: Path, device: str) -> Path:
    """Random N(0, 0.02) weights under HF LLaMA names (bf16, made on the GPU), plus the tokenizer files."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    out.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**shape, max_position_embeddings=131072, rms_norm_eps=1e-5,
                         torch_dtype="bfloat16" if device == "cuda" else "float32",
                         bos_token_id=1, eos_token_id=2)
    config.save_pretrained(out)
    torch.manual_seed(0)
    e, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = shape["num_key_value_heads"] * e // shape["num_attention_heads"]

    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def rand(*size):
        return torch.randn(*size, device=device, dtype=dtype).mul_(0.02).cpu()

    def ones(size):
        return torch.ones(size, dtype=dtype)

    shard = {"model.embed_tokens.weight": rand(v, e), "model.norm.weight": ones(e)}
    if not shape["tie_word_embeddings"]:
        shard["lm_head.weight"] = rand(v, e)
    save_file(shard, out / "model-embed.safetensors", metadata={"format": "pt"})
    for layer in range(shape["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shard = {p + "self_attn.q_proj.weight": rand(e, e), p + "self_attn.k_proj.weight": rand(kv, e),
                 p + "self_attn.v_proj.weight": rand(kv, e), p + "self_attn.o_proj.weight": rand(e, e),
                 p + "mlp.gate_proj.weight": rand(i, e), p + "mlp.up_proj.weight": rand(i, e),
                 p + "mlp.down_proj.weight": rand(e, i),
                 p + "input_layernorm.weight": ones(e), p + "post_attention_layernorm.weight": ones(e)}
        save_file(shard, out / f"model-layer{layer:03d}.safetensors", metadata={"format": "pt"})
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out / name)
    return out


def run_offline(path: Path, num: int, max_seqs: int, device: str, chunk: int) -> dict:
    done = subprocess.run([sys.executable, "-c", OFFLINE, str(path), str(num), str(max_seqs), device, str(chunk)],
                          cwd=REPO,
                          capture_output=True, text=True, check=True)
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 600.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return time.monotonic() - start
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not become healthy")


def run_server(path: Path, concurrency: int, num: int, max_seqs: int, chunk: int, out_dir: Path, device: str,
               extra: list[str], label: str, bench_warmup: bool = True, passes: int = 1) -> dict:
    """A fresh server, a warm-up on other prompts, then workload T at `concurrency`; the bench's aggregates.
    Without `bench_warmup`, the first pass meets the server as it came up; `passes` > 1 runs workload T again
    on other prompts (seeds 1, 2, ...) and reports each pass's throughput."""
    port = free_port()
    serve = [sys.executable, "-m", "llmserve.cli", "serve", "--model", str(path), "--device", device,
             "--port", str(port), "--max-num-seqs", str(max_seqs), "--max-model-len", "4096",
             "--max-num-batched-tokens", str(chunk),
             "--max-waiting", "100000", "--served-model-name", "m", "--no-access-log", *extra]
    log = open(out_dir / f"server-{label}.log", "w")
    proc = subprocess.Popen(serve, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        ready_s = wait_healthy(port, proc)
        bench = [sys.executable, "-m", "llmserve.cli", "bench", "serve", "--base-url", f"http://127.0.0.1:{port}",
                 "--model", "m", "--endpoint", "completions", "--dataset", "random", "--no-progress",
                 "--ignore-eos", "--output-len", "256"]
        if bench_warmup:
            subprocess.run([*bench, "--num-prompts", "48", "--seed", "99", "--output-len", "32",
                            "--concurrency", "48"], cwd=REPO, check=True, capture_output=True)  # other ids
        runs = []
        for seed in range(passes):
            result_file = out_dir / f"server-{label}{'' if seed == 0 else f'-pass{seed + 1}'}.json"
            subprocess.run([*bench, "--num-prompts", str(num), "--seed", str(seed), "--concurrency",
                            str(concurrency), "--out", str(result_file), "--metrics-interval-ms", "0"], cwd=REPO,
                           check=True, capture_output=True)
            runs.append(json.loads(result_file.read_text())["runs"][0])
        agg = runs[0]["aggregates"]
        return {"concurrency": concurrency, "startup_to_healthy_s": ready_s, "command": " ".join(serve),
                "bench_warmup": bench_warmup, "output_tok_s": agg["output_throughput"],
                "ttft_ms": {k: 1e3 * agg["ttft"][k] for k in ("p50", "p99")},
                "itl_ms": {k: 1e3 * agg["itl"][k] for k in ("p50", "p99")}, "requests": runs[0]["requests"],
                "passes_output_tok_s": [r["aggregates"]["output_throughput"] for r in runs]}
    finally:
        proc.send_signal(2)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="llama-1b")
    parser.add_argument("--tokenizer", required=True, help="folder with the tokenizer files (SmolLM2's)")
    parser.add_argument("--work-dir", default="/tmp/llmserve-e")
    parser.add_argument("--num-prompts", type=int, default=512)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--concurrency", default="256", help="comma-separated levels")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048, help="for both the offline engine and serve")
    parser.add_argument("--api-server-counts", default="1", help="comma-separated --api-server-count values")
    parser.add_argument("--serve-arg", action="append", default=[], help="extra `serve` flag (repeatable)")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to try the script with --model tiny")
    parser.add_argument("--cold-start", action="store_true",
                        help="no offline run, no bench warm-up: two passes of workload T on each fresh server, "
                             "with the engine's start-up warm-up and without it (--no-warmup)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--log-dir", default=None, help="server logs and bench results (default: beside --out)")
    args = parser.parse_args()
    import torch

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    out_dir = Path(args.log_dir or Path(args.out).parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    path = write_checkpoint(SHAPES[args.model], Path(args.tokenizer), Path(args.work_dir) / args.model, args.device)
    card = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    result = {"workload": "E", "model": args.model, "card": card,
              "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "command": " ".join(sys.argv), "checkpoint_seconds": time.monotonic() - start,
              "server": []}
    if args.cold_start:
        for warmup in ("--warmup", "--no-warmup"):
            run = run_server(path, int(args.concurrency.split(",")[0]), args.num_prompts, args.max_num_seqs,
                             args.max_num_batched_tokens, out_dir, args.device, [*args.serve_arg, warmup],
                             label=f"cold{warmup[1:]}", bench_warmup=False, passes=2)
            result["server"].append(run)
            print(json.dumps(run), flush=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        return 0
    result["offline"] = run_offline(path, args.num_prompts, args.max_num_seqs, args.device,
                                    args.max_num_batched_tokens)
    print(json.dumps(result["offline"]), flush=True)
    for level in map(int, args.concurrency.split(",")):
        for count in map(int, args.api_server_counts.split(",")):
            extra = [*args.serve_arg, "--api-server-count", str(count)]
            run = run_server(path, level, args.num_prompts, args.max_num_seqs, args.max_num_batched_tokens, out_dir,
                             args.device, extra,
                             label=f"c{level}-api{count}")
            run["api_server_count"] = count
            run["ratio_to_offline"] = run["output_tok_s"] / result["offline"]["output_tok_s"]
            result["server"].append(run)
            print(json.dumps(run), flush=True)
        Path(args.out).write_text(json.dumps(result, indent=2))  # what is measured so far survives a timeout
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
