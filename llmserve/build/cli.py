"""`llmserve convert` and `llmserve build`: checkpoint conversion and engine builds from the command line."""

from __future__ import annotations

import argparse
import sys


def cmd_convert(args: argparse.Namespace) -> int:
    from llmserve.checkpoint.convert import convert_checkpoint
    from llmserve.checkpoint.pull import resolve_model

    try:
        source = resolve_model(args.model, progress=lambda msg: print(msg, file=sys.stderr))
        out = convert_checkpoint(source, args.out, tp_size=args.tp, pp_size=args.pp, dtype=args.dtype)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from llmserve.build.profile import load_profile
    from llmserve.build.repository import EngineRepository
    from llmserve.build.target import current_target
    from llmserve.build.trtllm_build import require_trtllm
    from llmserve.build.worker import run_build
    from llmserve.checkpoint.pull import resolve_model

    try:
        checkpoint = resolve_model(args.checkpoint or args.model, progress=lambda msg: print(msg, file=sys.stderr))
        profile = load_profile(args.config)
        if profile.backend == "trtllm":
            require_trtllm()  # say what is missing before any hashing or conversion
        existing = EngineRepository(args.repo).lookup_or_none(checkpoint, profile, current_target(args.device))
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if existing and not args.force:
        print("already built (use --force to rebuild)", file=sys.stderr)
        print(existing)
        return 0
    print(f"building {profile.name} ({profile.backend}) in a worker process ...", file=sys.stderr)
    result = run_build(checkpoint, profile, args.repo, args.device)
    if not result.ok:
        print(f"error: build failed: {result.error}", file=sys.stderr)
        return 1
    print(result.engine_dir)
    return 0


def cmd_engines(args: argparse.Namespace) -> int:
    from llmserve.build.repository import EngineRepository
    from llmserve.build.target import describe

    for entry in EngineRepository(args.repo).list():
        print(f"{entry['engine_dir']}\t{entry['backend']}\t{describe(entry['target'])}\t{entry['built_at']}\t"
              f"{entry.get('status', '?')}")
    return 0


def add_subcommands(sub) -> None:
    """Register `convert`, `build` and `engines` on the `llmserve` subparsers."""
    convert = sub.add_parser("convert", help="HF LLaMA -> TensorRT-LLM checkpoint (config.json + rank shards)")
    convert.add_argument("--model", default="default", help="'default' or a HuggingFace checkpoint directory")
    convert.add_argument("--out", required=True, help="output directory")
    convert.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    convert.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    convert.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                         help="weight dtype (default: the checkpoint's)")
    convert.set_defaults(func=cmd_convert)

    build = sub.add_parser("build", help="build an engine in a worker process and file it in the repository")
    source = build.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", default=None, help="HF or converted checkpoint directory")
    source.add_argument("--model", default="default", help="'default' or a checkpoint directory")
    build.add_argument("--config", required=True, help="build profile, build_configs/NAME.(yaml|toml)")
    build.add_argument("--repo", default="engines", help="engine repository root")
    build.add_argument("--device", default="cpu", help="the target: cpu or cuda[:N]")
    build.add_argument("--force", action="store_true", help="rebuild even when the repository has it")
    build.set_defaults(func=cmd_build)

    engines = sub.add_parser("engines", help="list the engines in a repository")
    engines.add_argument("--repo", default="engines")
    engines.set_defaults(func=cmd_engines)
