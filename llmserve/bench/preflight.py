"""Checks before the run: the server answers, accepts the key and serves `--model` (GET /v1/models, then
GET /v1/models/{model} for a name the list leaves out, such as an alias)."""

from __future__ import annotations

import asyncio
from typing import Callable

import aiohttp

from llmserve.bench.client import EndpointConfig
from llmserve.bench.errors import BenchError

MODELS_TIMEOUT_S = 10.0


async def check_model(endpoint: EndpointConfig, warn: Callable[[str], None]) -> None:
    """Raise BenchError when the server is unreachable, refuses the key or does not list the model.

    A server without a usable model list (404, not JSON, too slow) gets a warning and the run goes
    on: the requests themselves will then say whether the model exists.
    """
    url = endpoint.v1_url + "/models"
    try:
        status, body = await _get_json(url, endpoint)
    except aiohttp.ClientConnectorError as exc:
        raise BenchError(f"cannot connect to {endpoint.v1_url} ({exc.strerror or exc}): "
                         "is the server running, and is --base-url right?") from None
    except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
        warn(f"GET {url} failed ({type(exc).__name__}): not checking that the server serves {endpoint.model!r}")
        return
    if status in (401, 403):
        raise BenchError(f"the server refused GET {url} (HTTP {status}): pass a valid --api-key")
    served = served_model_ids(body) if status == 200 else None
    if served is None:
        warn(f"GET {url} gave no model list (HTTP {status}): not checking that the server serves "
             f"{endpoint.model!r}")
        return
    if endpoint.model not in served and not await _retrievable(f"{url}/{endpoint.model}", endpoint):
        raise BenchError(not_served_message(endpoint.model, served))


async def _retrievable(url: str, endpoint: EndpointConfig) -> bool:
    """Whether GET /v1/models/{name} answers 200: an alias the list leaves out (llmserve's `default`)."""
    try:
        status, _ = await _get_json(url, endpoint)
    except (asyncio.TimeoutError, aiohttp.ClientError):
        return False
    return status == 200


def served_model_ids(body) -> list[str] | None:
    """The model ids of an OpenAI `/v1/models` answer, or None when it is not one."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        return None
    return [item["id"] for item in data if isinstance(item, dict) and isinstance(item.get("id"), str)]


def not_served_message(model: str, served: list[str]) -> str:
    """The one line that names what the server serves instead of `model`."""
    if not served:
        return f"the server lists no model yet (still loading or building?), so not {model!r}: retry when it does"
    names = ", ".join(repr(name) for name in served)
    return f"the server does not serve model {model!r}; it serves {names}: pass one of them to --model"


async def _get_json(url: str, endpoint: EndpointConfig) -> tuple[int, object]:
    """(status, parsed body or None when the body is not JSON)."""
    timeout = aiohttp.ClientTimeout(total=MODELS_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(url, headers=endpoint.headers()) as resp:
            try:
                return resp.status, await resp.json(content_type=None)
            except ValueError:
                return resp.status, None
