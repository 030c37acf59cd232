"""The aiohttp application factory and its lifecycle.

Shutdown order (aiohttp's, plus ours): the listening sockets close; `on_shutdown`
refuses new requests, gives in-flight ones `shutdown_timeout` seconds to finish, then
aborts the rest (open streams end with an error event and `[DONE]`); aiohttp then
cancels any handler left; last, the cleanup context stops the engine loop, which
aborts whatever remains, so every KV block is free.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web

from llmserve.engine.async_engine import AsyncEngine
from llmserve.server.config import ServerConfig
from llmserve.server.generation import InflightRuns
from llmserve.server.logprobs import TokenPieces
from llmserve.server.metrics import ServerMetrics
from llmserve.server.middleware import MIDDLEWARES, add_request_id
from llmserve.server.routes import setup_routes
from llmserve.server.state import CONFIG, ENGINE, INFLIGHT, METRICS, SHUTTING_DOWN, STARTED, TOKEN_PIECES

logger = logging.getLogger(__name__)
ABORT_GRACE_S = 2.0  # after aborting, time for handlers to write their last frames


def create_app(config: ServerConfig, engine: AsyncEngine) -> web.Application:
    """An app serving `engine`; the engine loop runs exactly while the app does."""
    app = web.Application(middlewares=MIDDLEWARES, client_max_size=config.max_body_bytes)
    app[CONFIG] = config
    app[ENGINE] = engine
    app[METRICS] = ServerMetrics(engine)
    app[INFLIGHT] = InflightRuns()
    app[TOKEN_PIECES] = TokenPieces(engine.engine.tokenizer)
    app[SHUTTING_DOWN] = asyncio.Event()
    app[STARTED] = int(time.time())
    app.cleanup_ctx.append(engine_loop)
    app.on_shutdown.append(drain_inflight)
    app.on_response_prepare.append(add_request_id)
    setup_routes(app)
    return app


def runner_kwargs(config: ServerConfig) -> dict:
    """What `web.run_app` / `web.AppRunner` need so that disconnects cancel handlers."""
    return {"handler_cancellation": True, "shutdown_timeout": config.shutdown_timeout, "access_log": None}


async def engine_loop(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: start the engine loop with the app, stop it (aborting all) at cleanup."""
    engine = app[ENGINE]
    await engine.start()
    logger.info("engine loop started; serving %r", app[CONFIG].served_model_name)
    yield
    await engine.stop()
    logger.info("engine loop stopped")


async def drain_inflight(app: web.Application) -> None:
    """on_shutdown: let in-flight requests finish within the deadline, then abort them."""
    app[SHUTTING_DOWN].set()
    inflight, timeout = app[INFLIGHT], app[CONFIG].shutdown_timeout
    if await inflight.wait_idle(timeout):
        return
    logger.warning("shutdown: aborting %d requests still running after %.1fs", len(inflight), timeout)
    inflight.abort_all()
    await inflight.wait_idle(ABORT_GRACE_S)
