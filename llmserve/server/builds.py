"""Engines from the engine repository: loading a built one, and building one while the server runs."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from llmserve.build.profile import BuildProfile
from llmserve.build.repository import apply_overrides, load_engine_config
from llmserve.build.worker import build_in_background
from llmserve.config import EngineConfig
from llmserve.frontend.engine_client import EngineClient
from llmserve.server.announce import announce
from llmserve.server.engine_clients import make_engine_client
from llmserve.server.models import BUILDING, ModelRegistry, ServedModel

logger = logging.getLogger(__name__)


class BuildFailedError(RuntimeError):
    """The build worker reported a failure; the message is its error text."""


def load_built_engine(engine_dir: str | Path, base_config: EngineConfig, target: dict | None = None) -> EngineClient:
    """The engine client of a built engine folder: its payload as the model, the profile's limits over `base_config`.

    Raises TargetMismatchError (naming both targets) when the engine was built for another `target`.
    """
    payload, overrides = load_engine_config(engine_dir, target)
    config = apply_overrides(dataclasses.replace(base_config, model=str(payload)), overrides)
    return make_engine_client(config, progress=logger.info)


async def build_and_load(checkpoint_dir: str | Path, profile: str | Path | BuildProfile, repo_root: str | Path,
                         base_config: EngineConfig, device: str = "cpu") -> EngineClient:
    """Build in a worker process (the loop keeps serving), then load the engine in a thread."""
    result = await build_in_background(checkpoint_dir, profile, repo_root, device)
    if not result.ok:
        raise BuildFailedError(result.error or "the build failed without an error message")
    return await load_in_background(result.engine_dir, base_config)


async def load_in_background(engine_dir: str | Path, base_config: EngineConfig) -> EngineClient:
    """`load_built_engine` in a worker thread, so the event loop keeps serving the other models."""
    return await asyncio.to_thread(load_built_engine, engine_dir, base_config)


async def _finish_build(registry: ModelRegistry, model: ServedModel) -> None:
    try:
        engine = await model.build()
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 (any failure is the model's error; the server stays up)
        announce.error("building model %r failed: %s; requests for it get 500 (the other models keep serving)",
                       model.name, exc)
        model.mark_failed(str(exc) or type(exc).__name__)
        return
    await engine.start()  # before it is visible, so no request meets a stopped engine
    model.mark_ready(engine)
    announce.info("model %r is built and serving", model.name)


def build_runner(registry: ModelRegistry):
    """A cleanup_ctx that runs every pending build as a task and cancels the unfinished at cleanup."""

    async def run_builds(app: web.Application) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(_finish_build(registry, m), name=f"build {m.name}")
                 for m in registry if m.status == BUILDING and m.build is not None]
        yield
        for task in tasks:
            task.cancel()  # kills a build worker still running
        await asyncio.gather(*tasks, return_exceptions=True)

    return run_builds
