"""`llmserve serve` and `llmserve chat`; the only place the server reads flags and environment."""

from __future__ import annotations

import argparse
import logging
import os
import sys

API_KEY_ENV = "LLMSERVE_API_KEY"


def add_subcommands(sub) -> None:
    """Register `serve` and `chat` on the top-level CLI's subparsers."""
    from llmserve.cli import add_engine_args

    serve = sub.add_parser("serve", help="serve the OpenAI API over HTTP")
    add_engine_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", default=None,
                       help="the model id clients use (default: the checkpoint folder's name, or the engine "
                            "manifest's model name; 'default' is always accepted too)")
    serve.add_argument("--api-key", default=None, help=f"require this bearer token (default: ${API_KEY_ENV})")
    serve.add_argument("--max-waiting", type=int, default=1024,
                       help="most requests waiting to run: accepted but not running (not yet started by the "
                            "scheduler, or preempted); beyond it new requests get 429 with Retry-After, and one "
                            "asking for more completions (n times its prompts) than this gets 400")
    serve.add_argument("--allowed-hosts", default=None, metavar="HOST[,HOST...]",
                       help="Host header names to answer, any port ('*': any); others get 421 (default: with a "
                            "loopback --host only localhost, 127.0.0.1 and [::1], against DNS rebinding; else any)")
    serve.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body size limit")
    serve.add_argument("--shutdown-timeout", type=float, default=20.0,
                       help="seconds in-flight requests get to finish on SIGINT/SIGTERM (a second signal aborts "
                            "them at once)")
    serve.add_argument("--body-timeout", type=float, default=30.0,
                       help="seconds to receive a request body once its headers arrived (408 beyond)")
    serve.add_argument("--keepalive-timeout", type=float, default=75.0,
                       help="seconds before an idle connection, or one still sending headers, is closed")
    serve.add_argument("--sse-keepalive", type=float, default=15.0,
                       help="send a ': keep-alive' comment after this many silent seconds in a stream (0: never)")
    serve.add_argument("--queue-timeout", type=float, default=None,
                       help="end a request still waiting to start after this many seconds with 503 (default: "
                            "no limit)")
    serve.add_argument("--max-n", type=int, default=16, help="most choices (n) per request")
    serve.add_argument("--generation-config", default="auto", choices=["auto", "none"],
                       help="auto: sampling fields a request omits (temperature, top_p, top_k, min_p, "
                            "repetition_penalty, max_tokens) come from the model's generation_config.json; "
                            "none: the OpenAI API's defaults")
    serve.add_argument("--default-max-tokens", type=int, default=None,
                       help="max_tokens of a request that sets none, on both endpoints (default: the model's "
                            "generation_config.json, else the rest of the context for chat and 16 for completions)")
    serve.add_argument("--no-access-log", action="store_true", help="no per-request log line")
    serve.add_argument("--engine", default=None, help="serve a built engine folder (from `llmserve build`)")
    serve.add_argument("--build-config", default=None,
                       help="serve --model's engine for this build profile from --repo, building it in the "
                            "background (503 + Retry-After meanwhile) when the repository lacks it")
    serve.add_argument("--repo", default="engines", help="engine repository root for --build-config")
    serve.add_argument("--also-build", action="append", default=[], metavar="MODEL=PROFILE",
                       help="also serve MODEL (named after its folder; 'default': the default model's folder), "
                            "built in the background from PROFILE; repeatable")
    serve.add_argument("--api-server-count", type=int, default=1,
                       help="API processes (HTTP, tokenization, streaming) sharing --port and one engine core")
    serve.add_argument("--engine-in-process", action="store_true",
                       help="run the engine core inside the API process, for debugging (by default it runs in a "
                            "process of its own)")
    serve.set_defaults(func=cmd_serve)

    chat = sub.add_parser("chat", help="chat with a running server in the terminal")
    chat.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    chat.add_argument("--api-key", default=None, help=f"bearer token (default: ${API_KEY_ENV})")
    chat.add_argument("--model", default=None, help="default: the first model the server lists")
    chat.add_argument("--system", default=None, help="a system prompt")
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.add_argument("--max-tokens", type=int, default=512)
    chat.set_defaults(func=cmd_chat)


def server_config_from_args(args: argparse.Namespace, default_name: str | None = None):
    """The ServerConfig of `serve`'s flags; the served name follows `served_name`'s rule."""
    from llmserve.server.config import ServerConfig

    return ServerConfig(host=args.host, port=args.port, served_model_name=served_name(args, default_name),
                        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                        max_waiting=args.max_waiting, max_body_bytes=args.max_body_bytes,
                        shutdown_timeout=args.shutdown_timeout, max_n=args.max_n,
                        body_timeout=args.body_timeout, keepalive_timeout=args.keepalive_timeout,
                        sse_keepalive_s=args.sse_keepalive, queue_timeout=args.queue_timeout or None,
                        generation_config=args.generation_config, default_max_tokens=args.default_max_tokens,
                        allowed_hosts=_host_list(args.allowed_hosts))


def _host_list(value: str | None) -> tuple[str, ...] | None:
    """--allowed-hosts' comma-separated names; None when the flag is absent (the default applies)."""
    if value is None:
        return None
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    if not names:
        raise ValueError(f"--allowed-hosts needs at least one host name (or '*' for any), got {value!r}")
    return names


def served_name(args: argparse.Namespace, manifest_name: str | None = None) -> str:
    """The main model's name: --served-model-name, else (for --engine) the manifest's model name, else the
    --model checkpoint folder's name. `default` stays accepted as its alias (see server/models.py)."""
    return args.served_model_name or manifest_name or checkpoint_name(args.model)


def checkpoint_name(model: str) -> str:
    """A checkpoint's served name: its folder's name; `default` is the default model's folder."""
    from llmserve.checkpoint.pull import DEFAULT_MODEL_NAME

    return DEFAULT_MODEL_NAME if model == "default" else os.path.basename(os.path.normpath(model))


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from llmserve.build.repository import TargetMismatchError
    from llmserve.server.lifecycle import ListenError, serve_until_signalled

    _show_announcements()
    if not args.no_access_log:
        logging.getLogger("llmserve.access").setLevel(logging.INFO)
    try:
        _use_fast_cpu_default(args)
        if _supervises(args):
            from llmserve.server.supervisor import serve_with_api_processes

            return serve_with_api_processes(args)
        app = app_from_args(args)
        return asyncio.run(serve_until_signalled(app, **_api_process_options(args)))
    except TargetMismatchError as exc:
        return _fail(str(exc), 2)
    except (ValueError, FileNotFoundError, RuntimeError, ListenError) as exc:
        return _fail(str(exc), 1)
    except KeyboardInterrupt:
        return _fail("interrupted before the server was ready", 130)


def uses_fast_cpu_default(args: argparse.Namespace) -> bool:
    """`serve --model default` on CPU with no --dtype, --quantization, engine or parallel flags."""
    plain = not (args.dtype or args.quantization or args.engine or args.build_config or args.tp > 1 or args.pp > 1)
    top_level = getattr(args, "core_address", None) is None  # API processes get what their supervisor chose
    return args.model == "default" and args.device == "cpu" and plain and top_level


def _use_fast_cpu_default(args: argparse.Namespace) -> None:
    """Serve the default model on CPU as its weight-only INT8 conversion (W8A16, made once, ~5 s): held-out
    perplexity +0.6 %, 2.6x float32's output rate at one stream and 1.7x at 16 (README: workload C).
    `--dtype float32` keeps the exact weights."""
    if not uses_fast_cpu_default(args):
        return
    _server_config(args, None)  # bad serve flags are refused before any conversion
    from llmserve.checkpoint.pull import CHECKPOINTS_DIR, COMPLETE_MARKER, DEFAULT_MODEL_NAME, pull_default_model
    from llmserve.quantization.schemes import convert_quantized

    target = CHECKPOINTS_DIR / f"{DEFAULT_MODEL_NAME}-w8a16"
    if not (target / COMPLETE_MARKER).exists():
        _say(f"converting the default model to weight-only INT8 (W8A16) for CPU serving: {target}")
        convert_quantized(pull_default_model(progress=_say), target, "int8-wo", progress=False)
        (target / COMPLETE_MARKER).write_text("ok\n")
    _say("serving the default model with INT8 weights (W8A16, perplexity +0.6 %); --dtype float32 serves the "
         "exact float32 weights")
    args.served_model_name = args.served_model_name or DEFAULT_MODEL_NAME
    args.model = str(target)


def _supervises(args: argparse.Namespace) -> bool:
    """Whether this process starts and watches several API processes (rather than being one of them)."""
    count = args.api_server_count
    if count < 1:
        raise ValueError(f"--api-server-count must be at least 1, got {count}")
    exclusive = [flag for flag, used in [("--engine-in-process", args.engine_in_process), ("--engine", args.engine),
                                         ("--build-config", args.build_config), ("--also-build", args.also_build)]
                 if used]
    if count > 1 and exclusive:
        raise ValueError(f"--api-server-count {count} serves one --model from a shared engine core; {exclusive[0]} "
                         f"needs a single API process: drop one of the two")
    return count > 1 and getattr(args, "core_address", None) is None


def _api_process_options(args: argparse.Namespace) -> dict:
    """An API process started by the supervisor shares the port and heeds only the stop signals it relays."""
    if getattr(args, "core_address", None) is None:
        return {}
    from llmserve.server.supervisor import API_STOP_SIGNALS

    return {"stop_signals": API_STOP_SIGNALS, "reuse_port": True}


def _show_announcements() -> None:
    """The banner and shutdown lines show at INFO unless --log-level asked for less than warnings."""
    if logging.getLogger().getEffectiveLevel() <= logging.WARNING:
        logging.getLogger("llmserve.announce").setLevel(logging.INFO)


def _fail(message: str, status: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return status


def app_from_args(args: argparse.Namespace):
    """The app `serve` runs: from --engine, from --model [--build-config] (built in the background when the
    repository lacks the engine), plus every --also-build model. Names are checked before anything loads."""
    from llmserve.cli import engine_config_from_args
    from llmserve.server.app import create_app
    from llmserve.server.engine_clients import make_engine_client

    base = engine_config_from_args(args)
    base.engine_in_process = args.engine_in_process
    manifest_name = _manifest_name(args.engine) if args.engine else None
    config = _server_config(args, manifest_name)
    _check_unique_names(config.served_model_name, [checkpoint_name(m) for m, _ in _also_build_specs(args)])
    building = dict(_also_build(args, base))
    if args.engine:
        return create_app(config, _engine_from_dir(args.engine, base, args.device), building=building)
    if not args.build_config:
        engine = make_engine_client(base, progress=_say, core_address=getattr(args, "core_address", None))
        return create_app(config, engine, building=building)
    engine_dir, build = _lookup_or_build(args.model, args.build_config, args.repo, base, args.device)
    if engine_dir is None:
        _say(f"no engine for {args.build_config} in {args.repo}: serving {config.served_model_name!r} "
             f"once its background build finishes")
        return create_app(config, None, building={config.served_model_name: build, **building})
    _say(f"serving the built engine {engine_dir}")
    return create_app(config, _engine_from_dir(engine_dir, base, args.device), building=building)


def _server_config(args: argparse.Namespace, manifest_name: str | None):
    try:
        return server_config_from_args(args, manifest_name)
    except AssertionError as exc:  # the config's own validation message names the bad value
        raise ValueError(f"invalid serve flag: {exc}") from exc


def _check_unique_names(main_name: str, also_names: list[str]) -> None:
    seen = {main_name}
    for name in also_names:
        if name in seen:
            raise ValueError(f"two models would be served as {name!r} (--model/--engine and --also-build, or "
                             f"--also-build twice); every served model needs its own name: rename the main one "
                             f"with --served-model-name, or drop the duplicate")
        seen.add(name)


def _manifest_name(engine_dir: str) -> str:
    from llmserve.build.repository import read_manifest

    return read_manifest(engine_dir).get("model_name") or checkpoint_name(engine_dir)


def _engine_from_dir(engine_dir, base, device: str):
    """The engine client of a built engine folder, by the manifest's backend; refuses another target's engine."""
    from llmserve.build.repository import read_manifest
    from llmserve.build.target import current_target
    from llmserve.server.builds import load_built_engine

    manifest = read_manifest(engine_dir)
    if manifest.get("backend") == "trtllm":
        return _trtllm_engine(engine_dir, manifest)
    return load_built_engine(engine_dir, base, current_target(device))


def _trtllm_engine(engine_dir, manifest: dict):
    """A TensorRT-LLM engine is served through TrtllmEngine, whose construction says what is missing without
    tensorrt_llm."""
    from llmserve.backends.trtllm import TrtllmEngine
    from llmserve.build.repository import check_target, engine_payload
    from llmserve.build.target import current_target

    engine = TrtllmEngine(engine_payload(engine_dir, manifest))
    check_target(manifest, current_target("cuda"))
    return engine


def _lookup_or_build(model: str, profile_path: str, repo_root: str, base, device: str):
    """(the built engine folder or None, an EngineBuild that loads it, building it first when missing)."""
    import functools

    from llmserve.build.profile import load_profile
    from llmserve.build.repository import EngineRepository
    from llmserve.build.target import current_target
    from llmserve.checkpoint.pull import resolve_model
    from llmserve.server.builds import build_and_load, load_in_background

    checkpoint = resolve_model(model, progress=_say)
    profile = load_profile(profile_path)
    engine_dir = EngineRepository(repo_root).lookup_or_none(checkpoint, profile, current_target(device))
    if engine_dir is not None:
        return engine_dir, functools.partial(load_in_background, engine_dir, base)
    return None, functools.partial(build_and_load, checkpoint, profile, repo_root, base, device)


def _also_build_specs(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(MODEL, PROFILE) per --also-build MODEL=PROFILE."""
    specs = []
    for spec in args.also_build:
        model, sep, profile_path = spec.partition("=")
        if not sep or not model or not profile_path:
            raise ValueError(f"--also-build wants MODEL=PROFILE, got {spec!r}")
        specs.append((model, profile_path))
    return specs


def _also_build(args: argparse.Namespace, base):
    """(name, EngineBuild) per --also-build MODEL=PROFILE; an engine already in the repository is only loaded."""
    for model, profile_path in _also_build_specs(args):
        _, build = _lookup_or_build(model, profile_path, args.repo, base, args.device)
        yield checkpoint_name(model), build


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> int:
    from llmserve.server.chat_client import ChatClientConfig, run_chat

    config = ChatClientConfig(base_url=args.base_url, api_key=args.api_key or os.environ.get(API_KEY_ENV),
                              model=args.model, system=args.system, temperature=args.temperature,
                              max_tokens=args.max_tokens)
    return run_chat(config)
