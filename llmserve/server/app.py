"""The aiohttp application factory and its lifecycle.

Shutdown order (aiohttp's, plus ours; `lifecycle.graceful_shutdown` runs steps 1-3 before aiohttp's
own cleanup so that open keep-alive connections still get answers while the server drains):
1. the listening sockets close; new requests on open connections get 503 `shutting_down`, and
   every response from then on closes its connection;
2. in-flight requests get `shutdown_timeout` seconds to finish (ABORT_NOW, set by a second signal,
   ends the wait at once);
3. the rest are aborted: open streams end with an error event and `[DONE]`, the others get 503;
   ABORT_GRACE_S lets their last bytes out;
4. aiohttp closes the connections (cancelling any handler left after RUNNER_SHUTDOWN_S); the
   cleanup contexts cancel unfinished background builds (killing their worker processes) and stop
   every engine loop, which aborts whatever remains, so every KV block is free.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web

from llmserve.frontend.engine_client import EngineClient
from llmserve.server.announce import announce
from llmserve.server.builds import build_runner
from llmserve.server.config import ServerConfig
from llmserve.server.generation import InflightRuns
from llmserve.server.http_log import ConnectionLogger
from llmserve.server.metrics import ServerMetrics
from llmserve.server.middleware import MIDDLEWARES, add_request_id
from llmserve.server.models import EngineBuild, ModelRegistry
from llmserve.server.routes import setup_routes
from llmserve.server.state import (ABORT_NOW, CONFIG, ENGINE, INFLIGHT, METRICS, MODELS, SHUTTING_DOWN, STARTED,
                                   TOKENIZING)
from llmserve.server.tokenizing import TokenizingWorker

logger = logging.getLogger(__name__)
ABORT_GRACE_S = 2.0  # after aborting, time for handlers to write their last frames
RUNNER_SHUTDOWN_S = 1.0  # aiohttp's per-connection wait at close; our own drain has already waited


def create_app(config: ServerConfig, engine: EngineClient | None,
               extra_models: dict[str, EngineClient] | None = None,
               building: dict[str, EngineBuild] | None = None) -> web.Application:
    """An app serving `engine` as `config.served_model_name`, plus `extra_models` by name, plus the
    `building` models, each built by its EngineBuild in the background once the app runs.

    Engine clients run exactly while the app does; `engine` may be None when only building models exist.
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
    app[ABORT_NOW] = asyncio.Event()
    app[STARTED] = int(time.time())
    app[TOKENIZING] = TokenizingWorker()
    app.cleanup_ctx.append(engine_loop)
    app.cleanup_ctx.append(build_runner(app[MODELS]))  # cleaned up first: no build finishes after the engines stop
    app.on_shutdown.append(drain_inflight)
    app.on_response_prepare.append(add_request_id)
    app.on_response_prepare.append(close_connection_if_asked)
    setup_routes(app)
    return app


def runner_kwargs(config: ServerConfig) -> dict:
    """What `web.AppRunner` needs: disconnects cancel handlers, idle connections time out, a short final close."""
    return {"handler_cancellation": True, "shutdown_timeout": RUNNER_SHUTDOWN_S, "access_log": None,
            "keepalive_timeout": config.keepalive_timeout, "logger": ConnectionLogger()}


def _registry(config: ServerConfig, engine: EngineClient | None, extra_models: dict[str, EngineClient],
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
    """cleanup_ctx: start the ready engines with the app, stop every one (aborting all) at cleanup."""
    for model in app[MODELS].ready():
        await model.engine.start()
    logger.info("engines started; models: %s", app[MODELS].statuses())
    yield
    for model in app[MODELS].ready():  # includes the engines built while the app ran
        await model.engine.stop()
    app[TOKENIZING].shutdown()
    logger.info("engines stopped")


async def close_connection_if_asked(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: honour a handler's `Connection: close`, and close every connection while shutting
    down, so that clients open a fresh one (to another replica) instead of reusing this one."""
    if request.app[SHUTTING_DOWN].is_set() or response.headers.get("Connection", "").lower() == "close":
        response.force_close()
        response.headers["Connection"] = "close"  # aiohttp computed its headers before this hook


async def drain_inflight(app: web.Application) -> int:
    """on_shutdown: let in-flight requests finish within the deadline (or until ABORT_NOW), then abort them;
    returns how many were aborted."""
    app[SHUTTING_DOWN].set()
    inflight, timeout = app[INFLIGHT], app[CONFIG].shutdown_timeout
    if not len(inflight):
        return 0
    if not app[ABORT_NOW].is_set():
        announce.info("shutting down: waiting up to %g s for %d in-flight requests; press Ctrl-C again to abort "
                      "them", timeout, len(inflight))
        if await _idle_before_abort(inflight, app[ABORT_NOW], timeout):
            return 0
    num_aborted = len(inflight)
    announce.warning("shutting down: aborting %d in-flight requests", num_aborted)
    inflight.abort_all()
    await inflight.wait_idle(ABORT_GRACE_S)
    return num_aborted


async def _idle_before_abort(inflight: InflightRuns, abort_now: asyncio.Event, timeout: float) -> bool:
    """True when every run ended within `timeout` seconds and before `abort_now` was set."""
    idle = asyncio.ensure_future(inflight.wait_idle(timeout))
    aborted = asyncio.ensure_future(abort_now.wait())
    await asyncio.wait({idle, aborted}, return_when=asyncio.FIRST_COMPLETED)
    aborted.cancel()
    if not idle.done():
        idle.cancel()
        return False
    return idle.result()
