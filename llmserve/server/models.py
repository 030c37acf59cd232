"""The served models: each one ready (an engine), building (in the background) or failed (an error)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from llmserve.engine.async_engine import AsyncEngine
from llmserve.server.errors import APIError
from llmserve.server.logprobs import TokenPieces

READY, BUILDING, FAILED = "ready", "building", "failed"
# Builds an engine (not yet started) in the background; raising marks the model failed.
EngineBuild = Callable[[], Awaitable[AsyncEngine]]


@dataclass(slots=True)
class ServedModel:
    """One model id clients can name; `engine` and `token_pieces` are set exactly when ready."""

    name: str
    status: str = READY
    engine: AsyncEngine | None = None
    token_pieces: TokenPieces | None = None
    error: str | None = None
    build: EngineBuild | None = None  # run by the app's cleanup context while status is 'building'

    def mark_ready(self, engine: AsyncEngine) -> None:
        self.status, self.engine, self.error, self.build = READY, engine, None, None
        self.token_pieces = TokenPieces(engine.engine.tokenizer)

    def mark_failed(self, error: str) -> None:
        self.status, self.error, self.build = FAILED, error, None


class ModelRegistry:
    """Served models by name, in registration order (the first ready one answers requests without `model`)."""

    def __init__(self, build_retry_after_s: int = 5):
        self.build_retry_after_s = build_retry_after_s
        self._models: dict[str, ServedModel] = {}

    def __len__(self) -> int:
        return len(self._models)

    def __iter__(self):
        return iter(list(self._models.values()))

    def add_ready(self, name: str, engine: AsyncEngine) -> ServedModel:
        model = self._add(ServedModel(name, status=BUILDING))
        model.mark_ready(engine)
        return model

    def add_building(self, name: str, build: EngineBuild) -> ServedModel:
        """Register `name` as building; the app runs `build()` once it starts (see builds.run_builds)."""
        return self._add(ServedModel(name, status=BUILDING, build=build))

    def _add(self, model: ServedModel) -> ServedModel:
        assert model.name, "a served model name must not be empty"
        assert model.name not in self._models, f"the model name {model.name!r} is registered twice"
        self._models[model.name] = model
        return model

    def ready(self) -> list[ServedModel]:
        return [m for m in self._models.values() if m.status == READY]

    def statuses(self) -> dict[str, str]:
        return {name: model.status for name, model in self._models.items()}

    def default(self) -> ServedModel | None:
        """The model a request without `model` gets: the first ready one, else the first registered."""
        ready = self.ready()
        return ready[0] if ready else next(iter(self._models.values()), None)

    def find(self, name: str | None) -> ServedModel | None:
        return self.default() if name is None else self._models.get(name)

    def select(self, name: str | None) -> ServedModel:
        """The ready model `name` names (None: the default), or the APIError a request for it gets."""
        model = self.find(name)
        if model is None:
            served = ", ".join(repr(n) for n in self._models)
            raise APIError(404, f"the model '{name}' does not exist; this server serves {served}",
                           param="model", code="model_not_found")
        if model.status == BUILDING:
            raise APIError(503, f"model {model.name} is being built; retry later", param="model",
                           code="model_building", headers={"Retry-After": str(self.build_retry_after_s)})
        if model.status == FAILED:
            raise APIError(500, f"model {model.name} failed to build: {model.error}", param="model",
                           code="model_build_failed")
        return model
