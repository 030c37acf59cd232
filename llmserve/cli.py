"""`llmserve` command line: pull, generate, serve, chat, convert, build, bench, eval."""

from __future__ import annotations

import argparse
import copy
import logging
import re
import signal
import sys
import threading

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEFAULT_LOG_LEVEL = "WARNING"
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a Ctrl-C'd command
# Help that already states its default in words, e.g. "(default: the model dtype)".
_STATES_DEFAULT = re.compile(r"\(default|default:")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Help that ends each option's text with its default; None, False and [] (meaning "off") are left out."""

    def _format_action(self, action: argparse.Action) -> str:
        if _shows_default(action):
            action = copy.copy(action)
            action.help = f"{action.help or ''} (default: %(default)s)".strip()
        return super()._format_action(action)


def _shows_default(action: argparse.Action) -> bool:
    default = action.default
    if not action.option_strings or default is None or default is False or default == [] \
            or default == argparse.SUPPRESS or action.help == argparse.SUPPRESS:
        return False
    return not _STATES_DEFAULT.search(action.help or "")


class CliParser(argparse.ArgumentParser):
    """A parser (and, through add_subparsers, every subcommand's) whose help shows defaults and which
    accepts --log-level before or after the subcommand."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        # SUPPRESS: a subcommand's parser must not reset a level given before the subcommand.
        self.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default=argparse.SUPPRESS,
                          help=f"logging level, before or after the subcommand (default: {DEFAULT_LOG_LEVEL})")


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Flags shared by every command that runs the engine."""
    parser.add_argument("--model", default="default", help="'default' or a checkpoint directory")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block (a power of two)")
    parser.add_argument("--num-blocks", type=int, default=None, help="KV blocks (overrides the memory budget)")
    parser.add_argument("--kv-cache-memory", type=float, default=None, help="KV cache budget in GiB")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.90,
                        help="CUDA: fraction of GPU memory the model and KV cache may use")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens per engine step")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="sequences per engine step")
    parser.add_argument("--max-model-len", type=int, default=8192,
                        help="longest prompt + output, capped by the model's context")
    parser.add_argument("--no-prefix-caching", action="store_true", help="do not reuse KV blocks of shared prefixes")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                        help="CUDA: fp8 (e4m3) keys and values, half the KV bytes (default: the model dtype)")
    parser.add_argument("--enforce-eager", action="store_true", help="CUDA: no CUDA graphs")
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=None,
                        help="run throwaway requests at start-up so Triton kernels compile before the first "
                             "request (default: on CUDA only)")
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                        help="schedule and launch step N+1 before step N's tokens reach the host "
                             "(default: on for CUDA, off for CPU)")
    parser.add_argument("--quantization", default=None, choices=["int8"],
                        help="CPU: int8 weights with dynamic int8 activations (about 2x faster decode)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    parser.add_argument("--tp", "--tensor-parallel-size", dest="tp", type=int, default=1,
                        help="tensor-parallel ranks, one worker process each (gloo on CPU, NCCL on CUDA)")
    parser.add_argument("--pp", "--pipeline-parallel-size", dest="pp", type=int, default=1,
                        help="pipeline stages (layers split across them), tp ranks each")
    parser.add_argument("--dist-timeout", type=float, default=120.0,
                        help="seconds a rank may wait on another inside a step before the engine stops "
                             "(a rank died or hung)")
    parser.add_argument("--dist-init-method", default=None, metavar="tcp://HOST:PORT",
                        help="where the ranks meet; needed when some run on other hosts (default: a free "
                             "port on 127.0.0.1)")
    parser.add_argument("--local-ranks", type=int, default=None,
                        help="ranks this host runs, rank 0 included; the rest join with `llmserve worker` "
                             "(default: all)")


def engine_config_from_args(args: argparse.Namespace):
    """The EngineConfig of the engine flags; ValueError names the first invalid value."""
    from llmserve.config import CacheConfig, DeviceConfig, EngineConfig, ParallelConfig, SchedulerConfig

    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    kv_bytes = int(args.kv_cache_memory * (1 << 30)) if args.kv_cache_memory else None
    return EngineConfig(
        model=args.model, seed=args.seed, warmup=args.warmup,
        cache=CacheConfig(block_size=args.block_size, num_blocks=args.num_blocks,
                          kv_cache_memory_bytes=kv_bytes, gpu_memory_utilization=args.gpu_memory_utilization,
                          enable_prefix_caching=not args.no_prefix_caching, kv_cache_dtype=args.kv_cache_dtype),
        scheduler=SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens,
                                  max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                                  max_waiting=getattr(args, "max_waiting", 1024),
                                  async_scheduling=args.async_scheduling),
        device=DeviceConfig(device=args.device, dtype=dtype, enforce_eager=args.enforce_eager,
                            quantization=args.quantization),
        parallel=ParallelConfig(args.tp, args.pp, args.dist_timeout, args.dist_init_method, args.local_ranks))


def cmd_pull(args: argparse.Namespace) -> int:
    from llmserve.checkpoint.pull import pull_default_model

    path = pull_default_model(progress=_say)
    print(path)
    return 0


def start_engine(args: argparse.Namespace):
    """The engine of the engine flags, with its tokenizer (ValueError when the model has none). Flags, model
    folder and device are checked before torch loads: a typo costs no wait."""
    from llmserve.build.target import current_target
    from llmserve.checkpoint.pull import resolve_model

    config = engine_config_from_args(args)
    resolve_model(args.model, progress=_say)
    current_target(args.device)
    from llmserve.engine.engine import Engine

    engine = Engine.from_config(config, progress=_say)
    if engine.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer files (tokenizer.json, tokenizer_config.json, ...): copy "
                         f"them from the model it was made from")
    return engine


def cmd_generate(args: argparse.Namespace) -> int:
    from llmserve.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    engine = start_engine(args)
    from llmserve.llm import LLM

    llm = LLM(engine=engine)
    if args.chat:
        result = llm.chat([{"role": "user", "content": args.prompt}], params)[0]
    else:
        result = llm.generate(args.prompt, params)[0]
    print(result.outputs[0].text)
    llm.shutdown()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """One rank of a parallel engine whose rank 0 runs on another host; torchrun starts one per GPU."""
    import os

    from llmserve.checkpoint.pull import resolve_model

    config = engine_config_from_args(args)
    if not config.parallel.distributed_init_method:
        raise ValueError("a worker needs --dist-init-method tcp://HOST:PORT: the address rank 0 was given")
    rank = args.first_rank + int(os.environ.get("LOCAL_RANK", "0"))
    if not 0 < rank < config.parallel.world_size:
        raise ValueError(f"rank {rank} is outside 1..{config.parallel.world_size - 1} (tp x pp minus rank 0)")
    from llmserve.worker.parallel_runner import worker_main

    worker_main(rank, str(resolve_model(args.model, progress=_say)), config, config.parallel.distributed_init_method)
    return 0


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(prog="llmserve", description=__doc__)
    parser.set_defaults(log_level=DEFAULT_LOG_LEVEL)
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

    worker = sub.add_parser("worker", help="run ranks of a parallel engine on this host (under torchrun), joining "
                                           "an engine started elsewhere with --local-ranks and --dist-init-method")
    add_engine_args(worker)
    worker.add_argument("--first-rank", type=int, required=True,
                        help="the global rank of this host's LOCAL_RANK 0 (ranks are pp_rank * tp + tp_rank)")
    worker.set_defaults(func=cmd_worker)

    for register in _optional_commands():
        register(sub)
    return parser


def _optional_commands():
    """Subcommands that live with their own package (server, converter, builder, bench, eval)."""
    import importlib

    for module, name in [("llmserve.server.cli", "add_subcommands"),
                         ("llmserve.build.cli", "add_subcommands"),
                         ("llmserve.bench.cli", "add_bench_subcommands"),
                         ("llmserve.evaluate.cli", "add_eval_subcommands")]:
        try:
            yield getattr(importlib.import_module(module), name)
        except ModuleNotFoundError as exc:
            if exc.name is None or not exc.name.startswith("llmserve"):
                raise


class _SigintRecorder:
    """Remembers that Ctrl-C arrived. Python raises KeyboardInterrupt wherever the main thread is, and
    when that is inside a callback from C code the library may report it as its own error instead."""

    def __init__(self) -> None:
        self.received = False
        self._previous = None

    def _on_sigint(self, signum, frame) -> None:
        self.received = True
        signal.default_int_handler(signum, frame)

    def __enter__(self) -> "_SigintRecorder":
        # Only the main thread may set handlers; a caller's own handler is left be.
        if threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def main(argv: list[str] | None = None) -> int:
    """Run one command; expected failures and Ctrl-C end in one line on stderr and a non-zero status."""
    log_level = DEFAULT_LOG_LEVEL
    sigint = _SigintRecorder()
    try:
        args = build_parser().parse_args(argv)
        log_level = args.log_level
        logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        with sigint:
            return args.func(args) or 0
    except KeyboardInterrupt:
        return _interrupted()
    except Exception as exc:
        if sigint.received:  # C code (torch's) turned the KeyboardInterrupt into an error of its own
            return _interrupted()
        if isinstance(exc, expected_errors()):
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_ERROR
        if log_level == "DEBUG":
            raise
        print(f"internal error: {type(exc).__name__}: {exc} (rerun with --log-level DEBUG for the traceback)",
              file=sys.stderr)
        return EXIT_ERROR


def _interrupted() -> int:
    """Say so and exit 130. A Ctrl-C still pending or repeated while the interpreter shuts down is ignored:
    one CI run saw the process die by SIGINT (status -2) after printing "interrupted"."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    print("interrupted", file=sys.stderr)
    return EXIT_INTERRUPTED


def expected_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean the request cannot be done as asked (bad input, missing files, no GPU), not a bug."""
    from llmserve.build.repository import TargetMismatchError
    from llmserve.build.target import NoCudaDeviceError
    from llmserve.build.trtllm_build import TrtllmUnavailableError
    from llmserve.checkpoint.pull import PullError

    return (ValueError, OSError, PullError, TrtllmUnavailableError, TargetMismatchError, NoCudaDeviceError)


if __name__ == "__main__":
    sys.exit(main())
