"""HTTP handlers and `setup_routes(app)`: the OpenAI endpoints, /health and /metrics."""

from __future__ import annotations

import uuid

from aiohttp import web

from llmserve.server.errors import APIError
from llmserve.server.metrics import CONTENT_TYPE
from llmserve.server.models import ServedModel
from llmserve.server.protocol import GenerationRequest, Limits, parse_chat, parse_completion
from llmserve.server.responses import ChatRenderer, CompletionRenderer
from llmserve.server.serving import read_json, serve_generation
from llmserve.server.structured import wants_grammar
from llmserve.server.state import CONFIG, METRICS, MODELS, SHUTTING_DOWN, STARTED, TOKENIZING

MAX_PROMPTS = 64  # prompts in one /v1/completions request
OFF_LOOP = 2**62  # a "size" that sends the parse to the tokenizing thread whatever the body's size


def _select(request: web.Request, body: dict) -> ServedModel:
    """The ready model the body's `model` names (a non-string is refused later, by the parser)."""
    name = body.get("model")
    return request.app[MODELS].select(name if isinstance(name, str) else None)


def _limits(app: web.Application, model: ServedModel) -> Limits:
    config = app[CONFIG]
    defaults = model.sampling_defaults if config.generation_config == "auto" else {}
    if config.default_max_tokens is not None:
        defaults = {**defaults, "max_tokens": config.default_max_tokens}
    return Limits(vocab_size=model.engine.info.vocab_size, max_n=app[CONFIG].max_n, max_prompts=MAX_PROMPTS,
                  defaults=defaults, grammars=model.grammars)


def _tokenizer(model: ServedModel):
    tokenizer = model.engine.tokenizer
    if tokenizer is None:
        raise APIError(500, "this model has no tokenizer", code="no_tokenizer")
    return tokenizer


async def _parse(request: web.Request, parse) -> tuple[ServedModel, GenerationRequest]:
    """The chosen model and the parsed body; a large body, and any that compiles a grammar, is parsed off
    the event loop."""
    body, num_bytes = await read_json(request)
    model = _select(request, body)
    args = (body, _tokenizer(model), _limits(request.app, model))
    cost = OFF_LOOP if wants_grammar(body) else num_bytes
    return model, await request.app[TOKENIZING].run(cost, parse, *args)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    model, gen = await _parse(request, parse_chat)
    renderer = ChatRenderer(f"chatcmpl-{uuid.uuid4().hex}", model.name, model.token_pieces,
                            include_usage=gen.include_usage, tool_calling=gen.tool_calling,
                            prompt_logprobs=gen.prompt_logprobs)
    return await serve_generation(request, model, gen, renderer)


async def completions(request: web.Request) -> web.StreamResponse:
    model, gen = await _parse(request, parse_completion)
    renderer = CompletionRenderer(
        f"cmpl-{uuid.uuid4().hex}", model.name, model.token_pieces,
        include_usage=gen.include_usage, prompts=gen.prompts, n=gen.params.n, echo_texts=gen.prompt_texts,
        logprobs_on=gen.params.logprobs is not None, prompt_logprobs=gen.prompt_logprobs)
    return await serve_generation(request, model, gen, renderer)


def _model_card(app: web.Application, model: ServedModel) -> dict:
    return {"id": model.name, "object": "model", "created": app[STARTED], "owned_by": "llmserve",
            "max_model_len": model.engine.info.max_model_len}


async def list_models(request: web.Request) -> web.Response:
    """The ready models only: one still building cannot be used yet."""
    cards = [_model_card(request.app, m) for m in request.app[MODELS].ready()]
    return web.json_response({"object": "list", "data": cards})


async def get_model(request: web.Request) -> web.Response:
    model = request.app[MODELS].select(request.match_info["model"])
    return web.json_response(_model_card(request.app, model))


async def health(request: web.Request) -> web.Response:
    """200 when every model is ready and its engine loop runs; 503 before, while building, after a
    failed build (the body names each model's status) and while shutting down."""
    models = request.app[MODELS]
    statuses = models.statuses()
    if any(status != "ready" for status in statuses.values()):
        status = "failed" if "failed" in statuses.values() else "building"
        return web.json_response({"status": status, "models": statuses}, status=503)
    if request.app[SHUTTING_DOWN].is_set() or not all(m.engine.is_running for m in models.ready()):
        return web.json_response({"status": "unavailable", "models": statuses}, status=503)
    return web.json_response({"status": "ok", "models": statuses})


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
