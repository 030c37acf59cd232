"""`llmserve convert` and `llmserve build`: checkpoint conversion and engine builds from the command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_convert(args: argparse.Namespace) -> int:
    from llmserve.checkpoint.convert import convert_checkpoint
    from llmserve.checkpoint.pull import resolve_model

    quantizer_for = None
    if args.quantization is not None:
        from llmserve.quantization.calibrate import CalibrationConfig
        from llmserve.quantization.schemes import quantizer_factory

        calibration = CalibrationConfig(args.calib_dataset, args.calib_size, args.calib_seq_len, args.calib_device)
        quantizer_for = quantizer_factory(args.quantization, calibration, args.smoothquant_alpha,
                                          group_size=args.group_size)
    source = resolve_model(args.model, progress=_say)
    print(convert_checkpoint(source, args.out, tp_size=args.tp, pp_size=args.pp, dtype=args.dtype,
                             quantizer_for=quantizer_for))
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from llmserve.build.profile import load_profile
    from llmserve.build.repository import EngineRepository
    from llmserve.build.target import current_target
    from llmserve.build.trtllm_build import require_trtllm
    from llmserve.build.worker import run_build
    from llmserve.checkpoint.pull import resolve_model

    profile = load_profile(args.config)
    if profile.backend == "trtllm":
        require_trtllm()  # say what is missing before any hashing or conversion
    target = current_target(args.device)
    profile.check_target(target)
    checkpoint = resolve_model(args.checkpoint or args.model, progress=_say)
    existing = EngineRepository(args.repo).lookup_or_none(checkpoint, profile, target)
    if existing and not args.force:
        _say("already built (use --force to rebuild)")
        print(existing)
        return 0
    _say(f"building {profile.name} ({profile.backend}) in a worker process ...")
    result = run_build(checkpoint, profile, args.repo, args.device)
    if not result.ok:
        _say(f"error: build failed: {result.error}")
        return 1
    print(result.engine_dir)
    return 0


def cmd_engines(args: argparse.Namespace) -> int:
    from llmserve.build.repository import EngineRepository
    from llmserve.build.target import describe

    root = Path(args.repo)
    if not root.is_dir():
        raise FileNotFoundError(f"engine repository {root} does not exist or is not a directory "
                                f"(`llmserve build --repo {root} ...` creates it)")
    entries = EngineRepository(root).list()
    if not entries:
        _say(f"no engines in {root}")
    for entry in entries:
        print(f"{entry['engine_dir']}\t{entry['backend']}\t{describe(entry['target'])}\t{entry['built_at']}\t"
              f"{entry.get('status', '?')}")
    return 0


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def add_subcommands(sub) -> None:
    """Register `convert`, `build` and `engines` on the `llmserve` subparsers."""
    convert = sub.add_parser("convert", help="HF LLaMA -> TensorRT-LLM checkpoint (config.json + rank shards)")
    convert.add_argument("--model", default="default", help="'default' or a HuggingFace checkpoint directory")
    convert.add_argument("--out", required=True,
                         help="output directory: new, empty, or a previous conversion (replaced whole once the new "
                              "one is complete); written under a temporary name, so Ctrl-C leaves nothing")
    convert.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    convert.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    convert.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                         help="weight dtype (default: the checkpoint's)")
    convert.add_argument("--quantization", default=None, choices=["fp8", "int8-sq", "int8-wo", "int4-wo"],
                         help="fp8: TensorRT-LLM's FP8 checkpoint (quant_algo FP8: float8_e4m3fn weights with "
                              "per-tensor weight and activation scales); int8-sq: INT8 SmoothQuant (quant_algo "
                              "W8A8_SQ_PER_CHANNEL: int8 weights with per-channel scales, smoothed int8 inputs "
                              "with a per-tensor scale); int8-wo: weight-only INT8 (quant_algo W8A16; the weights "
                              "stay in --dtype, as ModelOpt writes them, and are quantized per channel when loaded "
                              "or built); int4-wo: weight-only INT4 in groups of --group-size with AWQ scaling "
                              "(quant_algo W4A16_AWQ). The LM head stays in --dtype; all but int8-wo are calibrated "
                              "by running the model over --calib-dataset")
    convert.add_argument("--group-size", type=int, default=128,
                         help="int4-wo: input channels per scale; must divide the hidden, attention and MLP "
                              "sizes on each tensor rank (SmolLM2-135M: 64 or 32)")
    convert.add_argument("--smoothquant-alpha", type=float, default=0.5,
                         help="int8-sq: how much of the inputs' range moves into the weights, in [0, 1] "
                              "(0: no smoothing)")
    convert.add_argument("--calib-dataset", default="sharegpt",
                         help="sharegpt (its calibration part: never the text `llmserve eval ppl` holds out) or "
                              "jsonl:PATH (one {\"text\": ...} per line)")
    convert.add_argument("--calib-size", type=int, default=128, help="calibration samples")
    convert.add_argument("--calib-seq-len", type=int, default=512, help="tokens per sample, at most")
    convert.add_argument("--calib-device", default=None,
                         help="where calibration runs (default: cuda when available, else cpu)")
    convert.set_defaults(func=cmd_convert)

    build = sub.add_parser("build", help="build an engine in a worker process and file it in the repository")
    source = build.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", default=None, help="HF or converted checkpoint directory")
    source.add_argument("--model", default="default", help="'default' or a checkpoint directory")
    build.add_argument("--config", required=True, help="build profile, build_configs/NAME.(yaml|toml)")
    build.add_argument("--repo", default="engines", help="engine repository root")
    build.add_argument("--device", default="cpu",
                       help="the target: cpu or cuda[:N]; a profile's `device: cpu|cuda` must match it")
    build.add_argument("--force", action="store_true", help="rebuild even when the repository has it")
    build.set_defaults(func=cmd_build)

    engines = sub.add_parser("engines", help="list the engines in a repository")
    engines.add_argument("--repo", default="engines", help="engine repository root")
    engines.set_defaults(func=cmd_engines)
