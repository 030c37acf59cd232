"""The aiohttp application factory and its lifecycle.

Shutdown order (aiohttp's, plus ours): the listening sockets close; `on_shutdown`
refuses new requests, gives in-flight ones `shutdown_timeout` seconds to finish, then
aborts the rest (open streams end with an error event and `[DONE]`); aiohttp then
cancels any handler left; last, the cleanup contexts cancel unfinished background
builds (killing their worker processes) and stop every engine loop, which aborts
whatever remains, so every KV block is free.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web

from llmserve.engine.async_engine import AsyncEngine
from llmserve.server.builds import build_runner
from llmserve.server.config import ServerConfig
from llmserve.server.generation import InflightRuns
from llmserve.server.metrics import ServerMetrics
from llmserve.server.middleware import MIDDLEWARES, add_request_id
from llmserve.server.models import EngineBuild, ModelRegistry
from llmserve.server.routes import setup_routes
from llmserve.server.state import CONFIG, ENGINE, INFLIGHT, METRICS, MODELS, SHUTTING_DOWN, STARTED

logger = logging.getLogger(__name__)
ABORT_GRACE_S = 2.0  # after aborting, time for handlers to write their last frames


def create_app(config: ServerConfig, engine: AsyncEngine | None,
               extra_models: dict[str, AsyncEngine] | None = None,
               building: dict[str, EngineBuild] | None = None) -> web.Application:
    """An app serving `engine` as `config.served_model_name`, plus `extra_models` by name, plus the
    `building` models, each built by its EngineBuild in the background once the app runs.

    Engine loops run exactly while the app does; `engine` may be None when only building models exist.
    """
    app = web.Application(middlewares=MIDDLEWARES, client_max_size=config.max_body_bytes)
    app[CONFIG] = config
    app[MODELS] = _registry(config, engine, extra_models or {}, building or {})
    assert len(app[MODELS]), "create_app needs an engine or a model to build"
    if engine is not None:
        app[ENGINE] = engine
    app[METRICS] = ServerMetrics(app[MODELS])
    app[INFLIGHT] = InflightRuns()
    app[SHUTTING_DOWN] = asyncio.Event()
    app[STARTED] = int(time.time())
    app.cleanup_ctx.append(engine_loop)
    app.cleanup_ctx.append(build_runner(app[MODELS]))  # cleaned up first: no build finishes after the engines stop
    app.on_shutdown.append(drain_inflight)
    app.on_response_prepare.append(add_request_id)
    setup_routes(app)
    return app


def runner_kwargs(config: ServerConfig) -> dict:
    """What `web.run_app` / `web.AppRunner` need so that disconnects cancel handlers."""
    return {"handler_cancellation": True, "shutdown_timeout": config.shutdown_timeout, "access_log": None}


def _registry(config: ServerConfig, engine: AsyncEngine | None, extra_models: dict[str, AsyncEngine],
              building: dict[str, EngineBuild]) -> ModelRegistry:
    registry = ModelRegistry(config.build_retry_after_s)
    if engine is not None:
        registry.add_ready(config.served_model_name, engine)
    for name, extra in extra_models.items():
        registry.add_ready(name, extra)
    for name, build in building.items():
        registry.add_building(name, build)
    return registry


async def engine_loop(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: start the ready engines' loops with the app, stop every one (aborting all) at cleanup."""
    for model in app[MODELS].ready():
        await model.engine.start()
    logger.info("engine loops started; models: %s", app[MODELS].statuses())
    yield
    for model in app[MODELS].ready():  # includes the engines built while the app ran
        await model.engine.stop()
    logger.info("engine loops stopped")


async def drain_inflight(app: web.Application) -> None:
    """on_shutdown: let in-flight requests finish within the deadline, then abort them."""
    app[SHUTTING_DOWN].set()
    inflight, timeout = app[INFLIGHT], app[CONFIG].shutdown_timeout
    if await inflight.wait_idle(timeout):
        return
    logger.warning("shutdown: aborting %d requests still running after %.1fs", len(inflight), timeout)
    inflight.abort_all()
    await inflight.wait_idle(ABORT_GRACE_S)
