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
    serve.set_defaults(func=cmd_serve)

    chat = sub.add_parser("chat", help="chat with a running server in the terminal")
    chat.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    chat.add_argument("--api-key", default=None, help=f"bearer token (default: ${API_KEY_ENV})")
    chat.add_argument("--model", default=None, help="default: the first model the server lists")
    chat.add_argument("--system", default=None, help="a system prompt")
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.add_argument("--max-tokens", type=int, default=512)
    chat.set_defaults(func=cmd_chat)


def server_config_from_args(args: argparse.Namespace):
    from llmserve.server.config import ServerConfig

    name = args.served_model_name or (args.model if args.model == "default" else os.path.basename(
        os.path.normpath(args.model)))
    return ServerConfig(host=args.host, port=args.port, served_model_name=name,
                        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                        max_waiting=args.max_waiting, max_body_bytes=args.max_body_bytes,
                        shutdown_timeout=args.shutdown_timeout, max_n=args.max_n)


def cmd_serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from llmserve.cli import engine_config_from_args
    from llmserve.engine.async_engine import AsyncEngine
    from llmserve.engine.engine import Engine
    from llmserve.server.app import create_app, runner_kwargs

    config = server_config_from_args(args)
    if not args.no_access_log:
        logging.getLogger("llmserve.access").setLevel(logging.INFO)
    engine = Engine.from_config(engine_config_from_args(args), progress=lambda m: print(m, file=sys.stderr))
    app = create_app(config, AsyncEngine(engine))
    web.run_app(app, host=config.host, port=config.port, **runner_kwargs(config))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from llmserve.server.chat_client import ChatClientConfig, run_chat

    config = ChatClientConfig(base_url=args.base_url, api_key=args.api_key or os.environ.get(API_KEY_ENV),
                              model=args.model, system=args.system, temperature=args.temperature,
                              max_tokens=args.max_tokens)
    return run_chat(config)
