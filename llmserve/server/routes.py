"""HTTP handlers and `setup_routes(app)`: the OpenAI endpoints, /health and /metrics."""

from __future__ import annotations

import uuid

from aiohttp import web

from llmserve.server.errors import APIError
from llmserve.server.metrics import CONTENT_TYPE
from llmserve.server.protocol import Limits, parse_chat, parse_completion
from llmserve.server.responses import ChatRenderer, CompletionRenderer
from llmserve.server.serving import read_json, serve_generation
from llmserve.server.state import CONFIG, ENGINE, METRICS, SHUTTING_DOWN, STARTED, TOKEN_PIECES

MAX_PROMPTS = 64  # prompts in one /v1/completions request


def _limits(app: web.Application) -> Limits:
    engine = app[ENGINE].engine
    return Limits(vocab_size=engine.model_config.vocab_size, max_n=app[CONFIG].max_n, max_prompts=MAX_PROMPTS)


def _tokenizer(app: web.Application):
    tokenizer = app[ENGINE].engine.tokenizer
    if tokenizer is None:
        raise APIError(500, "this model has no tokenizer", code="no_tokenizer")
    return tokenizer


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    gen = parse_chat(body, _tokenizer(request.app), _limits(request.app))
    renderer = ChatRenderer(f"chatcmpl-{uuid.uuid4().hex}", request.app[CONFIG].served_model_name,
                            request.app[TOKEN_PIECES], include_usage=gen.include_usage)
    return await serve_generation(request, gen, renderer)


async def completions(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    gen = parse_completion(body, _tokenizer(request.app), _limits(request.app))
    renderer = CompletionRenderer(
        f"cmpl-{uuid.uuid4().hex}", request.app[CONFIG].served_model_name, request.app[TOKEN_PIECES],
        include_usage=gen.include_usage, prompts=gen.prompts, n=gen.params.n, echo_texts=gen.prompt_texts,
        logprobs_on=gen.params.logprobs is not None)
    return await serve_generation(request, gen, renderer)


def _model_card(app: web.Application) -> dict:
    return {"id": app[CONFIG].served_model_name, "object": "model", "created": app[STARTED], "owned_by": "llmserve",
            "max_model_len": app[ENGINE].engine.max_model_len}


async def list_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model_card(request.app)]})


async def get_model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    if name != request.app[CONFIG].served_model_name:
        raise APIError(404, f"the model '{name}' does not exist", param="model", code="model_not_found")
    return web.json_response(_model_card(request.app))


async def health(request: web.Request) -> web.Response:
    """200 once the engine loop runs, 503 before it and while shutting down."""
    if not request.app[ENGINE].is_running or request.app[SHUTTING_DOWN].is_set():
        return web.json_response({"status": "unavailable"}, status=503)
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE})


def setup_routes(app: web.Application) -> None:
    """Register every endpoint on `app`."""
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
