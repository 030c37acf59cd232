"""The life of one generation request: read, admit, run its choices, answer (stream or whole)."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from llmserve.frontend.engine_client import QueueTimeoutError, RequestOutput
from llmserve.server.body import parse_json_object
from llmserve.server.errors import APIError
from llmserve.server.generation import ChoiceRun, admit
from llmserve.server.models import ServedModel
from llmserve.server.protocol import GenerationRequest
from llmserve.server.responses import ChoiceState, Renderer, usage
from llmserve.server.sse import SSEStream
from llmserve.server.state import CONFIG, INFLIGHT, SHUTTING_DOWN, STATS

logger = logging.getLogger(__name__)
SHUTDOWN_ERROR = "the request was aborted because the server is shutting down"


async def read_json(request: web.Request) -> tuple[dict, int]:
    """The body as a JSON object and its size in bytes, or a 400 (a body over the size limit is a 413 from
    aiohttp; one slower than the body timeout a 408, and the connection closes)."""
    if request.app[SHUTTING_DOWN].is_set():
        raise APIError(503, "the server is shutting down; retry on a new connection", code="shutting_down")
    raw = await _read_body(request)
    return parse_json_object(raw), len(raw)


async def _read_body(request: web.Request) -> bytes:
    timeout = request.app[CONFIG].body_timeout
    try:
        return await asyncio.wait_for(request.read(), timeout)
    except asyncio.TimeoutError as exc:  # a trickled or missing body must not hold the connection for minutes
        raise APIError(408, f"the request body did not arrive within {timeout:g} s; send the whole body at once",
                       code="body_timeout", headers={"Connection": "close"}) from exc


async def serve_generation(request: web.Request, model: ServedModel, gen: GenerationRequest, renderer: Renderer
                           ) -> web.StreamResponse:
    """Admit `gen`, run all its choices in `model`'s engine, and answer; leaving aborts what still runs."""
    stats, config = request[STATS], request.app[CONFIG]
    reservation = admit(model, config, gen, renderer.prompt_param)
    stats.num_prompt_tokens = sum(len(p) for p in gen.prompts)
    run = ChoiceRun(model.engine, renderer.response_id, gen.prompts, gen.params, reservation, config.queue_timeout)
    inflight = request.app[INFLIGHT]
    inflight.add(run)
    try:
        async with run:
            if gen.stream:
                return await _stream(request, run, gen, renderer)
            return await _collect(request, run, gen, renderer)
    except QueueTimeoutError as exc:
        raise _queue_timeout_error(exc) from exc
    finally:
        inflight.discard(run)
        stats.finish_reasons.extend(["abort"] * run.num_unfinished)


async def _collect(request: web.Request, run: ChoiceRun, gen: GenerationRequest, renderer: Renderer) -> web.Response:
    choices = [ChoiceState(i, score_only=gen.score_only) for i in range(len(run.request_ids))]
    async for index, output in run:
        _record(request, choices[index], index, output)
    return web.json_response(renderer.response(choices, usage(gen.prompts, choices, gen.params.n)))


async def _stream(request: web.Request, run: ChoiceRun, gen: GenerationRequest, renderer: Renderer
                  ) -> web.StreamResponse:
    choices = [ChoiceState(i, score_only=gen.score_only) for i in range(len(run.request_ids))]
    sse = SSEStream(request, request.app[CONFIG].sse_keepalive_s)
    try:
        await sse.open()
        for chunk in renderer.opening_chunks(len(choices)):
            await sse.send(chunk)
        async for index, output in run:
            _record(request, choices[index], index, output)
            for chunk in renderer.delta_chunks(choices[index], output):
                await sse.send(chunk)
        if gen.include_usage:
            await sse.send(renderer.usage_chunk(usage(gen.prompts, choices, gen.params.n)))
        await sse.close()
    except ConnectionResetError:  # the client went away; leaving the ChoiceRun aborts the rest
        request[STATS].client_gone = True
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # the stream is open: the error travels as an event, then [DONE]
        await _end_with_error(request, sse, exc)
    finally:
        sse.stop_keepalive()
    return sse.response


def _record(request: web.Request, choice: ChoiceState, index: int, output: RequestOutput) -> None:
    request[STATS].on_output(index, output)
    if output.finish_reason == "abort":  # only shutdown aborts a request whose client is still here
        raise APIError(503, SHUTDOWN_ERROR, code="shutting_down")
    choice.add(output)


def _queue_timeout_error(exc: QueueTimeoutError) -> APIError:
    return APIError(503, str(exc), code="queue_timeout", headers={"Retry-After": "1"})


async def _end_with_error(request: web.Request, sse: SSEStream, exc: Exception) -> None:
    if isinstance(exc, QueueTimeoutError):
        exc = _queue_timeout_error(exc)
    if not isinstance(exc, APIError):
        logger.error("generation failed: %r", exc, exc_info=exc)
        exc = APIError(500, f"generation failed: {exc}", code="internal_error")
    request[STATS].error_status = exc.status
    try:
        await sse.send(exc.body())
        await sse.close()
    except ConnectionResetError:
        request[STATS].client_gone = True
