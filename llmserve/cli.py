"""`llmserve` command line: pull, generate, serve, chat, convert, build, bench."""

from __future__ import annotations

import argparse
import logging
import sys


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Flags shared by every command that runs the engine."""
    parser.add_argument("--model", default="default", help="'default' or a checkpoint directory")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-blocks", type=int, default=None, help="KV blocks (overrides the memory budget)")
    parser.add_argument("--kv-cache-memory", type=float, default=None, help="KV cache budget in GiB")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                        help="CUDA: fp8 (e4m3) keys and values, half the KV bytes (default: the model dtype)")
    parser.add_argument("--enforce-eager", action="store_true", help="CUDA: no CUDA graphs")
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                        help="schedule and launch step N+1 before step N's tokens reach the host "
                             "(default: on for CUDA, off for CPU)")
    parser.add_argument("--quantization", default=None, choices=["int8"],
                        help="CPU: int8 weights with dynamic int8 activations (about 2x faster decode)")
    parser.add_argument("--seed", type=int, default=0)


def engine_config_from_args(args: argparse.Namespace):
    from llmserve.config import CacheConfig, DeviceConfig, EngineConfig, SchedulerConfig

    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    kv_bytes = int(args.kv_cache_memory * (1 << 30)) if args.kv_cache_memory else None
    return EngineConfig(
        model=args.model, seed=args.seed,
        cache=CacheConfig(block_size=args.block_size, num_blocks=args.num_blocks,
                          kv_cache_memory_bytes=kv_bytes, gpu_memory_utilization=args.gpu_memory_utilization,
                          enable_prefix_caching=not args.no_prefix_caching, kv_cache_dtype=args.kv_cache_dtype),
        scheduler=SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens,
                                  max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                                  max_waiting=getattr(args, "max_waiting", 1024),
                                  async_scheduling=args.async_scheduling),
        device=DeviceConfig(device=args.device, dtype=dtype, enforce_eager=args.enforce_eager,
                            quantization=args.quantization))


def cmd_pull(args: argparse.Namespace) -> int:
    from llmserve.checkpoint.pull import pull_default_model

    path = pull_default_model(progress=lambda msg: print(msg, file=sys.stderr))
    print(path)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from llmserve.engine.engine import Engine
    from llmserve.llm import LLM
    from llmserve.sampling_params import SamplingParams

    engine = Engine.from_config(engine_config_from_args(args), progress=lambda m: print(m, file=sys.stderr))
    llm = LLM(engine=engine)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    if args.chat:
        result = llm.chat([{"role": "user", "content": args.prompt}], params)[0]
    else:
        result = llm.generate(args.prompt, params)[0]
    print(result.outputs[0].text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmserve", description=__doc__)
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    pull = sub.add_parser("pull", help="materialise the default model under checkpoints/")
    pull.set_defaults(func=cmd_pull)

    gen = sub.add_parser("generate", help="generate text offline and print it")
    add_engine_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.set_defaults(func=cmd_generate)

    for register in _optional_commands():
        register(sub)
    return parser


def _optional_commands():
    """Subcommands that live with their own package (server, converter, builder, bench)."""
    import importlib

    for module, name in [("llmserve.server.cli", "add_subcommands"),
                         ("llmserve.build.cli", "add_subcommands"),
                         ("llmserve.bench.cli", "add_bench_subcommands")]:
        try:
            yield getattr(importlib.import_module(module), name)
        except ModuleNotFoundError as exc:
            if exc.name is None or not exc.name.startswith("llmserve"):
                raise


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
