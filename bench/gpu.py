"""GPU benchmark: card ceilings, llmserve on workloads T and L, HuggingFace peers, one run.

Usage (on a CUDA machine):  python bench/gpu.py --models llama-1b,llama-8b --out bench/results/gpu.json
Prints a table with ratios against the HF peers and fractions of the roofline, and
writes everything (card, date, versions, settings) as JSON. Workloads: bench/workloads.md.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmserve.checkpoint.model_config import ModelConfig  # noqa: E402
from llmserve.config import CacheConfig, DeviceConfig, EngineConfig, SchedulerConfig  # noqa: E402
from llmserve.engine.engine import Engine  # noqa: E402
from llmserve.models.loader import build_model  # noqa: E402
from llmserve.sampling_params import SamplingParams  # noqa: E402

MODELS = {
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "llama-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
    # Llama-3-70B's shape: does not fit one H200 in bf16 with room for KV; run it at --tp 4
    "llama-70b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                      intermediate_size=28672, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
    # Llama-3.1-405B's shape: about 101 GB of bf16 weights per GPU at --tp 8
    "llama-405b": dict(hidden_size=16384, num_hidden_layers=126, num_attention_heads=128, num_key_value_heads=8,
                       intermediate_size=53248, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
}


def model_config(name: str) -> ModelConfig:
    f = MODELS[name]
    return ModelConfig(head_dim=f["hidden_size"] // f["num_attention_heads"], max_position_embeddings=131072,
                       rms_norm_eps=1e-5, dtype="bfloat16", **f)


def workload_t(num_requests: int = 512) -> list[list[int]]:
    """Prompt lengths uniform in [256, 1024], then ids uniform in [100, 30000), one generator."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(256, 1024, size=num_requests, endpoint=True)
    return [rng.integers(100, 30000, size=int(n)).tolist() for n in lengths]


# ---- ceilings -------------------------------------------------------------------------
def time_cuda(fn, repeat: int = 10) -> float:
    """Median seconds of `fn` over `repeat` runs, after two warm-ups, timed with events."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return float(np.median(times))


def measure_ceilings() -> dict:
    n = 1 << 30  # 2 GiB of bf16 per buffer
    copy_s = _time_copy(n)
    mm_s = _time_matmul(8192)
    torch.cuda.empty_cache()
    return {"copy_bandwidth_Bps": 2 * n * 2 / copy_s, "bf16_matmul_flops": 2 * 8192 ** 3 / mm_s}


def _time_copy(n: int) -> float:
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return time_cuda(lambda: dst.copy_(src))


def _time_matmul(size: int) -> float:
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    return time_cuda(lambda: a @ b)


# ---- rooflines ------------------------------------------------------------------------
def weight_bytes(cfg: ModelConfig) -> int:
    e, i, layers, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = cfg.num_key_value_heads * cfg.head_dim
    per_layer = e * (e + 2 * kv) + e * e + 3 * e * i + 2 * e
    embed = v * e * (1 if cfg.tie_word_embeddings else 2)
    return 2 * (layers * per_layer + embed + e)


def kv_bytes_per_token(cfg: ModelConfig, elem_bytes: int = 2) -> int:
    """K and V of every layer for one token; elem_bytes 2 for bf16, 1 for an fp8 cache."""
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * elem_bytes


def roofline_t(cfg: ModelConfig, prompts: list[list[int]], out_len: int, ceil: dict, max_concurrency: int,
               kv_elem_bytes: int = 2) -> float:
    """Seconds: prefill at the matmul rate plus decode steps reading weights and KV at copy bandwidth."""
    params = weight_bytes(cfg) / 2
    prefill_s = 2 * params * sum(map(len, prompts)) / ceil["bf16_matmul_flops"]
    steps = out_len * -(-len(prompts) // max_concurrency)
    kv_read = sum((len(p) + out_len / 2) * out_len for p in prompts) * kv_bytes_per_token(cfg, kv_elem_bytes)
    decode_s = (steps * weight_bytes(cfg) + kv_read) / ceil["copy_bandwidth_Bps"]
    return prefill_s + decode_s


# ---- llmserve ---------------------------------------------------------------------------
def make_engine(cfg: ModelConfig, max_num_seqs: int, max_num_batched_tokens: int, enforce_eager: bool,
                async_scheduling: bool | None = None, kv_cache_dtype: str = "auto",
                tokenizer_path: str | None = None, quantization: str | None = None) -> Engine:
    torch.manual_seed(0)
    model = build_model(cfg, "cuda", "bfloat16")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    if quantization is not None:
        quantize_in_place(model, cfg, quantization)
    config = EngineConfig(
        model="random", cache=CacheConfig(block_size=16, gpu_memory_utilization=0.90, kv_cache_dtype=kv_cache_dtype),
        scheduler=SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                                  max_model_len=4096, max_waiting=100000, async_scheduling=async_scheduling),
        device=DeviceConfig("cuda", "bfloat16", enforce_eager=enforce_eager))
    return Engine(model, cfg, config, tokenizer_path=tokenizer_path)  # the path: for grammars (structured.py)


def quantize_in_place(model, cfg: ModelConfig, quantization: str, num_samples: int = 32) -> None:
    """FP8, INT8 SmoothQuant (alpha 0.5) or INT4 AWQ (groups of 128) linears with input statistics
    calibrated on workload T's first prompts (cut to 512 tokens), run through a small eager engine over
    the bf16 model, as `llmserve convert --quantization ...` does; INT8 weight-only needs no calibration."""
    from llmserve.quantization.calibrate import recording_input_amax
    from llmserve.quantization.fp8 import quantize_native_fp8
    from llmserve.quantization.int8_sq import quantize_native_int8_sq
    from llmserve.quantization.weight_only import quantize_native_weight_only

    if quantization == "int8-wo":
        quantize_native_weight_only(model, bits=8)
        return

    config = EngineConfig(model="random", cache=CacheConfig(block_size=16, num_blocks=2048),
                          scheduler=SchedulerConfig(max_num_batched_tokens=8192, max_num_seqs=64, max_model_len=4096),
                          device=DeviceConfig("cuda", "bfloat16", enforce_eager=True), warmup=False)
    calibration = Engine(model, cfg, config)
    with recording_input_amax(model) as amax:
        run_engine(calibration, [p[:512] for p in workload_t(num_samples)], 1)
    del calibration
    gc.collect()
    torch.cuda.empty_cache()
    if quantization == "fp8":
        quantize_native_fp8(model, amax)
    elif quantization == "int4-wo":
        quantize_native_weight_only(model, bits=4, group_size=128, input_amax=amax)
    else:
        quantize_native_int8_sq(model, amax)
    gc.collect()
    torch.cuda.empty_cache()


def make_parallel_engine(cfg: ModelConfig, tp: int, pp: int, max_num_seqs: int, max_num_batched_tokens: int,
                         kv_cache_dtype: str = "auto") -> Engine:
    """An engine over tp x pp ranks (one worker process each) with random weights that every rank draws
    by tensor name (llmserve/checkpoint/random_weights.py): no checkpoint files, and the same model at any
    split, so tp=1 and tp=2 can be compared token for token."""
    import tempfile

    from llmserve.checkpoint.random_weights import write_random_checkpoint
    from llmserve.config import ParallelConfig

    hf_config = dict(MODELS[cfg_name(cfg)], architectures=["LlamaForCausalLM"], model_type="llama",
                     max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
                     head_dim=cfg.head_dim, torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2)
    path = write_random_checkpoint(tempfile.mkdtemp(prefix="llmserve-random-"), hf_config, seed=0)
    config = EngineConfig(
        model=str(path), cache=CacheConfig(block_size=16, gpu_memory_utilization=0.90, kv_cache_dtype=kv_cache_dtype),
        scheduler=SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                                  max_model_len=4096, max_waiting=100000),
        device=DeviceConfig("cuda", "bfloat16"), parallel=ParallelConfig(tp, pp))
    return Engine.from_config(config, progress=lambda message: print(message, file=sys.stderr, flush=True))


def _time_all_reduces(engine: Engine):
    """Start timing rank 0's all-reduces (None for one GPU)."""
    ranks = engine.core.ranks
    if ranks is None or ranks.parallel.tp_size == 1:
        return None
    from llmserve.distributed import CollectiveTimer

    ranks.parallel.all_reduce_timer = CollectiveTimer()
    return ranks.parallel.all_reduce_timer


def cfg_name(cfg: ModelConfig) -> str:
    return next(name for name, fields in MODELS.items()
                if fields["hidden_size"] == cfg.hidden_size and fields["num_hidden_layers"] == cfg.num_hidden_layers)


def greedy_tokens(engine: Engine, prompts: list[list[int]], out_len: int) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
    tokens = {f"g{i}": [] for i in range(len(prompts))}
    for i, prompt in enumerate(prompts):
        engine.add_request(f"g{i}", prompt, params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
    return [tokens[f"g{i}"] for i in range(len(prompts))]


def run_engine(engine: Engine, prompts: list[list[int]], out_len: int) -> dict:
    """Submit all prompts at once and run to completion; returns timings and token counts."""
    params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"b{i}", prompt, params)
    first_token_at, generated, steps = None, 0, 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        steps += 1
        generated += sum(len(o.new_token_ids) for o in outs)
        if first_token_at is None and outs:
            first_token_at = time.perf_counter()
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "output_tokens": generated, "steps": steps,
            "ttft_s": first_token_at - start, "output_tok_s": generated / elapsed,
            "total_tok_s": (generated + sum(map(len, prompts))) / elapsed,
            "preemptions": engine.scheduler.num_preemptions}


def llmserve_workloads(cfg: ModelConfig, args, ceil: dict) -> dict:
    results = {}
    world = args.tp * args.pp
    if world > 1 or args.match_tp1:  # the weights every split draws alike
        engine = make_parallel_engine(cfg, args.tp, args.pp, args.max_num_seqs, args.max_num_batched_tokens,
                                      args.kv_cache_dtype)
    else:
        engine = make_engine(cfg, args.max_num_seqs, args.max_num_batched_tokens, args.enforce_eager,
                             args.async_scheduling, args.kv_cache_dtype, quantization=args.quantization)
    results["tp"], results["pp"] = args.tp, args.pp
    results["kv_blocks"] = engine.kv.num_blocks
    results["kv_cache_dtype"] = args.kv_cache_dtype
    results["quantization"] = args.quantization
    kv_elem = 1 if args.kv_cache_dtype == "fp8" else 2
    results["async_scheduling"] = engine.async_scheduling
    if "L" in args.workloads:
        prompt = workload_t(1)[0][:128]
        run_engine(engine, [prompt], 8)  # warm-up
        r = run_engine(engine, [prompt], 256)
        r["tpot_ms"] = 1e3 * (r["seconds"] - r["ttft_s"]) / 255
        # per GPU: each tensor rank reads 1/tp of the weights and KV; pipeline stages run one after the other
        r["roofline_tpot_ms"] = 1e3 * (weight_bytes(cfg) + 384 * kv_bytes_per_token(cfg, kv_elem)) / args.tp / ceil[
            "copy_bandwidth_Bps"]
        results["L"] = r
    if "TTFT" in args.workloads:
        results["TTFT"] = ttft_idle(engine, cfg, ceil)
    if "T" in args.workloads:
        prompts = workload_t(args.num_requests)
        run_engine(engine, prompts[:8], 4)  # warm-up
        timer = _time_all_reduces(engine)
        r = run_engine(engine, prompts, 256)
        if timer is not None:  # rank 0's all-reduces (each tensor rank runs the same ones)
            r["all_reduce_ms_per_step"] = timer.total_ms() / r["steps"]
            r["all_reduces_per_step"] = timer.count / r["steps"]
        max_conc = min(args.max_num_seqs, engine.kv.num_blocks * 16 // 1280)
        r["roofline_s"] = roofline_t(cfg, prompts, 256, ceil, max(max_conc, 1), kv_elem) / args.tp
        r["roofline_output_tok_s"] = len(prompts) * 256 / r["roofline_s"]
        r["fraction_of_roofline"] = r["output_tok_s"] / r["roofline_output_tok_s"]
        results["T"] = r
    if args.match_tp1:
        prompts = [p[:256] for p in workload_t(args.match_tp1)]
        ours = greedy_tokens(engine, prompts, 32)
        results["match_tp1"] = {"prompts": len(prompts), "tokens": 32, "tokens_here": ours}
    engine.core.shutdown()
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    if args.match_tp1:  # the same random model on one GPU
        reference = make_parallel_engine(cfg, 1, 1, args.max_num_seqs, args.max_num_batched_tokens)
        want = greedy_tokens(reference, prompts, 32)
        del reference
        gc.collect()
        torch.cuda.empty_cache()
        same = sum(a == b for a, b in zip(ours, want))
        results["match_tp1"].update(equal_sequences=same, match_rate=same / len(prompts))
    return results
    gc.collect()
    torch.cuda.empty_cache()
    return results


def ttft_idle(engine: Engine, cfg: ModelConfig, ceil: dict, prompt_len: int = 1024, repeat: int = 5) -> dict:
    """Time to first token of one prompt on an idle engine (median of `repeat`), against its compute floor."""
    rng = np.random.default_rng(1)
    times = []
    for i in range(repeat + 1):  # the first run warms up
        prompt = rng.integers(100, 30000, size=prompt_len).tolist()  # fresh ids: no prefix-cache hit
        times.append(run_engine(engine, [prompt], 1)["ttft_s"])
    floor_s = 2 * weight_bytes(cfg) / 2 * prompt_len / ceil["bf16_matmul_flops"]
    median = float(np.median(times[1:]))
    return {"prompt_len": prompt_len, "ttft_ms": 1e3 * median, "compute_floor_ms": 1e3 * floor_s,
            "ratio_to_floor": median / floor_s}


# ---- HuggingFace peers -------------------------------------------------------------------
def make_hf_model(cfg: ModelConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                         num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                         num_key_value_heads=cfg.num_key_value_heads, vocab_size=cfg.vocab_size,
                         tie_word_embeddings=cfg.tie_word_embeddings, rope_theta=cfg.rope_theta,
                         max_position_embeddings=4096, torch_dtype="bfloat16")
    with torch.device("meta"):
        model = LlamaForCausalLM(hf_cfg)
    model = model.to_empty(device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.model.rotary_emb = type(model.model.rotary_emb)(hf_cfg).to("cuda")
    return model.eval()


def hf_static(model, prompts: list[list[int]], out_len: int, batch: int) -> dict:
    """Plain `generate` in static batches (left padded), forced to out_len tokens."""
    start, generated = time.perf_counter(), 0
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        width = max(map(len, chunk))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device="cuda")
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device="cuda")
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=out_len,
                                 min_new_tokens=out_len, do_sample=False, pad_token_id=0)
        generated += (out.shape[1] - width) * len(chunk)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "output_tokens": generated, "output_tok_s": generated / elapsed,
            "num_requests": len(prompts), "batch": batch}


def hf_continuous(model, prompts: list[list[int]], out_len: int) -> dict:
    from transformers import GenerationConfig

    gen = GenerationConfig(max_new_tokens=out_len, min_new_tokens=out_len, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    start = time.perf_counter()
    outputs = model.generate_batch(inputs=prompts, generation_config=gen)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    generated = sum(len(o.generated_tokens) for o in outputs.values())
    return {"seconds": elapsed, "output_tokens": generated, "output_tok_s": generated / elapsed,
            "num_requests": len(prompts)}


def hf_workloads(cfg: ModelConfig, args) -> dict:
    results = {}
    model = make_hf_model(cfg)
    prompts = workload_t(args.num_requests)[:args.hf_requests]
    if "L" in args.workloads:
        prompt = prompts[0][:128]
        hf_static(model, [prompt], 8, 1)
        r = hf_static(model, [prompt], 256, 1)
        r["tpot_ms"] = 1e3 * r["seconds"] / 256
        results["L_generate"] = r
    if "T" in args.workloads:
        results["T_generate"] = _guarded(hf_static, model, prompts, 256, 64)
        if "hf-cb" in args.peers:
            results["T_generate_batch"] = _guarded(hf_continuous, model, prompts, 256)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return results


def _guarded(fn, *a):
    try:
        return fn(*a)
    except Exception as exc:  # a peer's API drift must not lose our own numbers
        return {"error": f"{type(exc).__name__}: {exc}"}


# ---- report ------------------------------------------------------------------------------
def print_table(report: dict) -> None:
    ceil = report["ceilings"]
    print(f"\n{report['device']}  copy {ceil['copy_bandwidth_Bps'] / 1e12:.2f} TB/s  "
          f"bf16 matmul {ceil['bf16_matmul_flops'] / 1e12:.0f} TFLOP/s")
    for name, res in report["models"].items():
        ours, hf = res["llmserve"], res.get("hf", {})
        if "T" in ours:
            t = ours["T"]
            hf_rate = hf.get("T_generate", {}).get("output_tok_s")
            cb_rate = hf.get("T_generate_batch", {}).get("output_tok_s")
            if "all_reduce_ms_per_step" in t:
                print(f"{name} T: all-reduce {t['all_reduce_ms_per_step']:.2f} ms per step on rank 0 "
                      f"({t['all_reduces_per_step']:.0f} per step) of {1e3 * t['seconds'] / t['steps']:.2f} ms")
            print(f"{name} T: {t['output_tok_s']:.0f} out tok/s ({t['total_tok_s']:.0f} total) in {t['seconds']:.1f} s; "
                  f"roofline {t['roofline_output_tok_s']:.0f} -> {t['fraction_of_roofline']:.2f}; "
                  f"HF generate {_fmt(hf_rate)} (x{_ratio(t['output_tok_s'], hf_rate)}); "
                  f"HF generate_batch {_fmt(cb_rate)} (x{_ratio(t['output_tok_s'], cb_rate)})")
        if "TTFT" in ours:
            f = ours["TTFT"]
            print(f"{name} TTFT ({f['prompt_len']} tokens, idle): {f['ttft_ms']:.1f} ms; compute floor "
                  f"{f['compute_floor_ms']:.1f} ms (x{f['ratio_to_floor']:.2f})")
        if "match_tp1" in ours:
            m = ours["match_tp1"]
            print(f"{name} tp={ours['tp']} pp={ours['pp']}: {m['equal_sequences']} of {m['prompts']} greedy sequences "
                  f"equal one GPU's for {m['tokens']} tokens ({m['match_rate']:.2f})")
        if "L" in ours:
            l_ = ours["L"]
            hf_l = hf.get("L_generate", {}).get("tpot_ms")
            print(f"{name} L: {l_['tpot_ms']:.2f} ms/token; roofline {l_['roofline_tpot_ms']:.2f} ms "
                  f"(x{l_['tpot_ms'] / l_['roofline_tpot_ms']:.2f}); HF generate {_fmt(hf_l)} ms")


def _fmt(x):
    return "n/a" if x is None else f"{x:.1f}"


def _ratio(a, b):
    return "n/a" if not b else f"{a / b:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="llama-1b,llama-8b")
    parser.add_argument("--workloads", default="T,L")
    parser.add_argument("--peers", default="hf,hf-cb", help="comma list of hf, hf-cb, or 'none'")
    parser.add_argument("--num-requests", type=int, default=512)
    parser.add_argument("--hf-requests", type=int, default=64, help="requests given to each HF peer")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                        help="default: the engine's (on for CUDA)")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                        help="fp8: e4m3 KV cache (the roofline then counts 1 byte per K/V element)")
    parser.add_argument("--quantization", default=None, choices=["fp8", "int8-sq", "int8-wo", "int4-wo"],
                        help="the decoder linears in FP8 (per-tensor scales), INT8 SmoothQuant, INT8 weight-only or "
                             "INT4 AWQ weight-only (groups of 128), calibrated, as such a checkpoint runs")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (GPUs), random weights per rank")
    parser.add_argument("--pp", type=int, default=1, help="pipeline stages")
    parser.add_argument("--match-tp1", type=int, default=0, metavar="N",
                        help="also run N greedy prompts for 32 tokens here and on one GPU (same random model): "
                             "the fraction of equal sequences")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.tp * args.pp > 1:
        args.peers = "none"  # the HF peers run on one GPU
    args.workloads = args.workloads.split(",")
    args.peers = args.peers.split(",")
    import transformers
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name(), "command": " ".join(sys.argv),
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "python": platform.python_version()},
              "settings": vars(args), "ceilings": measure_ceilings(), "models": {}}
    for name in args.models.split(","):
        cfg = model_config(name)
        res = {"llmserve": llmserve_workloads(cfg, args, report["ceilings"])}
        if "none" not in args.peers:
            res["hf"] = hf_workloads(cfg, args)
        report["models"][name] = res
        print(json.dumps(res, indent=1), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    print_table(report)


if __name__ == "__main__":
    main()
