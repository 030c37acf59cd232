"""Middlewares, outermost first: request context (id, access log, metrics), errors, allowed hosts, auth,
JSON bodies."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid

from aiohttp import web

from llmserve.server.errors import APIError, from_http_exception
from llmserve.server.hosts import allowed_host_names, host_allowed
from llmserve.server.state import CONFIG, METRICS, STATS, RequestStats

access_logger = logging.getLogger("llmserve.access")
logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-Id"
OPEN_PATHS = frozenset({"/health", "/metrics"})  # probes and scrapers carry no key
GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
CLIENT_CLOSED = 499  # nginx's status for a client that went away before the response ended
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
MAX_SHOWN_HOST_CHARS = 100


def request_id_of(request: web.Request) -> str:
    """The client's x-request-id when it is a sane token, else a fresh one."""
    given = request.headers.get(REQUEST_ID_HEADER, "")
    return given if _SAFE_REQUEST_ID.match(given) else uuid.uuid4().hex


@web.middleware
async def context_middleware(request: web.Request, handler):
    """Give the request an id and stats; log one structured line and record metrics when it ends."""
    stats = RequestStats(request_id_of(request))
    request[STATS] = stats
    status = 500
    try:
        response = await handler(request)
        status = CLIENT_CLOSED if stats.client_gone else stats.error_status or response.status
        return response
    except (asyncio.CancelledError, ConnectionResetError):
        status = CLIENT_CLOSED
        raise
    finally:
        _finish(request, stats, status)


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare hook: every response, streamed ones included, carries the id."""
    stats = request.get(STATS)
    if stats is not None:
        response.headers[REQUEST_ID_HEADER] = stats.request_id


def _finish(request: web.Request, stats: RequestStats, status: int) -> None:
    duration = time.monotonic() - stats.arrival
    if request.path in GENERATION_PATHS:
        request.app[METRICS].observe(stats, duration, failed=400 <= status != CLIENT_CLOSED)
    access_logger.info(json.dumps({
        "method": request.method, "path": request.path, "status": status, "request_id": stats.request_id,
        "prompt_tokens": stats.num_prompt_tokens, "output_tokens": stats.num_output_tokens,
        "ttft_s": None if stats.ttft is None else round(stats.ttft, 6), "duration_s": round(duration, 6)}))


@web.middleware
async def error_middleware(request: web.Request, handler):
    """Every error leaves in OpenAI's shape; an unexpected one is logged and becomes a 500."""
    try:
        return await handler(request)
    except APIError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return from_http_exception(exc).response()
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        logger.exception("unhandled error in %s %s", request.method, request.path)
        return APIError(500, "internal server error", code="internal_error").response()


@web.middleware
async def host_middleware(request: web.Request, handler):
    """421 for a Host header this server does not answer (DNS rebinding); /health and /metrics included,
    since a rebound page could read the metrics."""
    config = request.app[CONFIG]
    host = request.headers.get("Host")
    if not host_allowed(host, allowed_host_names(config.host, config.allowed_hosts)):
        shown = host[:MAX_SHOWN_HOST_CHARS]
        raise APIError(421, f"this server does not answer for the host {shown!r}; if that name is meant to reach "
                            f"it, start the server with --allowed-hosts listing it (or '*' for any)",
                       code="host_not_allowed")
    return await handler(request)


@web.middleware
async def auth_middleware(request: web.Request, handler):
    """Bearer-token check in constant time; /health and /metrics stay open."""
    api_key = request.app[CONFIG].api_key
    if api_key is None or request.path in OPEN_PATHS:
        return await handler(request)
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(_raw(token.strip()), _raw(api_key)):
        raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return await handler(request)


def _raw(text: str) -> bytes:
    # header bytes that are not UTF-8 arrive as surrogate escapes; they must compare, not raise
    return text.encode("utf-8", "surrogatepass")


@web.middleware
async def json_body_middleware(request: web.Request, handler):
    """415 for a POST whose body is not declared JSON: a browser posts text/plain (or no type) to any site
    without asking first, so accepting it would let any web page run generations here."""
    routed = request.match_info.http_exception is None  # an unknown path stays a 404
    if request.method == "POST" and routed and request.content_type != "application/json":
        declared = request.headers.get("Content-Type")
        raise APIError(415, f"the body must be JSON sent with 'Content-Type: application/json', got "
                            f"{repr(declared) if declared else 'no Content-Type'}", code="unsupported_media_type")
    return await handler(request)


MIDDLEWARES = [context_middleware, error_middleware, host_middleware, auth_middleware, json_body_middleware]
