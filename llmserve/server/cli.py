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
    serve.add_argument("--served-model-name", default=None, help="the model id clients use (default: --model)")
    serve.add_argument("--api-key", default=None, help=f"require this bearer token (default: ${API_KEY_ENV})")
    serve.add_argument("--max-waiting", type=int, default=1024, help="queued requests beyond which 429 is sent")
    serve.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body size limit")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="seconds in-flight requests get to finish on shutdown")
    serve.add_argument("--max-n", type=int, default=16, help="most choices (n) per request")
    serve.add_argument("--no-access-log", action="store_true", help="no per-request log line")
    serve.add_argument("--engine", default=None, help="serve a built engine folder (from `llmserve build`)")
    serve.add_argument("--build-config", default=None,
                       help="serve --model's engine for this build profile from --repo, building it in the "
                            "background (503 + Retry-After meanwhile) when the repository lacks it")
    serve.add_argument("--repo", default="engines", help="engine repository root for --build-config")
    serve.add_argument("--also-build", action="append", default=[], metavar="MODEL=PROFILE",
                       help="also serve MODEL (named after its folder), built in the background from PROFILE; "
                            "repeatable")
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
    from llmserve.server.config import ServerConfig

    name = args.served_model_name or default_name or _model_name(args.model)
    return ServerConfig(host=args.host, port=args.port, served_model_name=name,
                        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                        max_waiting=args.max_waiting, max_body_bytes=args.max_body_bytes,
                        shutdown_timeout=args.shutdown_timeout, max_n=args.max_n)


def _model_name(model: str) -> str:
    return model if model == "default" else os.path.basename(os.path.normpath(model))


def cmd_serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from llmserve.build.repository import TargetMismatchError
    from llmserve.server.app import runner_kwargs
    from llmserve.server.state import CONFIG

    if not args.no_access_log:
        logging.getLogger("llmserve.access").setLevel(logging.INFO)
    try:
        app = app_from_args(args)
    except TargetMismatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    config = app[CONFIG]
    web.run_app(app, host=config.host, port=config.port, **runner_kwargs(config))
    return 0


def app_from_args(args: argparse.Namespace):
    """The app `serve` runs: from --engine, from --model [--build-config] (built in the background when the
    repository lacks the engine), plus every --also-build model."""
    from llmserve.cli import engine_config_from_args
    from llmserve.engine.async_engine import AsyncEngine
    from llmserve.engine.engine import Engine
    from llmserve.server.app import create_app

    base = engine_config_from_args(args)
    building = dict(_also_build(args, base))
    if args.engine:
        name, engine = _engine_from_dir(args.engine, base, args.device)
        return create_app(server_config_from_args(args, name), AsyncEngine(engine), building=building)
    config = server_config_from_args(args)
    if not args.build_config:
        engine = Engine.from_config(base, progress=_say)
        return create_app(config, AsyncEngine(engine), building=building)
    engine_dir, build = _lookup_or_build(args.model, args.build_config, args.repo, base, args.device)
    if engine_dir is None:
        _say(f"no engine for {args.build_config} in {args.repo}: serving {config.served_model_name!r} "
             f"once its background build finishes")
        return create_app(config, None, building={config.served_model_name: build, **building})
    _say(f"serving the built engine {engine_dir}")
    _, engine = _engine_from_dir(engine_dir, base, args.device)
    return create_app(config, AsyncEngine(engine), building=building)


def _engine_from_dir(engine_dir, base, device: str):
    """(model name from the manifest, Engine); refuses an engine built for another target."""
    from llmserve.build.repository import read_manifest
    from llmserve.build.target import current_target
    from llmserve.server.builds import load_built_engine

    name = read_manifest(engine_dir).get("model_name") or _model_name(str(engine_dir))
    return name, load_built_engine(engine_dir, base, current_target(device))


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


def _also_build(args: argparse.Namespace, base):
    """(name, EngineBuild) per --also-build MODEL=PROFILE; an engine already in the repository is only loaded."""
    for spec in args.also_build:
        model, sep, profile_path = spec.partition("=")
        if not sep or not model or not profile_path:
            raise ValueError(f"--also-build wants MODEL=PROFILE, got {spec!r}")
        _, build = _lookup_or_build(model, profile_path, args.repo, base, args.device)
        yield _model_name(model), build


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> int:
    from llmserve.server.chat_client import ChatClientConfig, run_chat

    config = ChatClientConfig(base_url=args.base_url, api_key=args.api_key or os.environ.get(API_KEY_ENV),
                              model=args.model, system=args.system, temperature=args.temperature,
                              max_tokens=args.max_tokens)
    return run_chat(config)
