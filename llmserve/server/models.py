"""The served models: each one ready (an engine), building (in the background) or failed (an error).

Model names, one rule: every model has one canonical name, the id `/v1/models` lists and responses
carry. The first model registered is the default model: a request without `model`, or with
`"model": "default"`, gets it, however the server was started (`default` is an alias, not listed).
Two models with one name, or `default` naming another model than the first, are refused.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from llmserve.frontend.engine_client import EngineClient
from llmserve.frontend.generation_config import generation_defaults
from llmserve.grammar.compiler import GrammarCompiler
from llmserve.server.errors import APIError
from llmserve.server.logprobs import TokenPieces

READY, BUILDING, FAILED = "ready", "building", "failed"
DEFAULT_ALIAS = "default"
# Builds an engine client (not yet started) in the background; raising marks the model failed.
EngineBuild = Callable[[], Awaitable[EngineClient]]


@dataclass(slots=True)
class ServedModel:
    """One model id clients can name; `engine` and `token_pieces` are set exactly when ready.

    `num_reserved`: waiting slots admission took for choices not yet handed to the engine
    (server/generation.py's Reservation), so that a burst cannot overshoot its queue limit.
    """

    name: str
    status: str = READY
    engine: EngineClient | None = None
    token_pieces: TokenPieces | None = None
    error: str | None = None
    build: EngineBuild | None = None  # run by the app's cleanup context while status is 'building'
    num_reserved: int = 0
    _sampling_defaults: dict | None = None
    _grammars: GrammarCompiler | None = None

    def mark_ready(self, engine: EngineClient) -> None:
        self.status, self.engine, self.error, self.build = READY, engine, None, None
        self.token_pieces = TokenPieces(engine.tokenizer)
        self._sampling_defaults = None
        self._grammars = None

    @property
    def sampling_defaults(self) -> dict:
        """The model's generation_config.json sampling fields (read once its engine has started)."""
        if self._sampling_defaults is None:
            self._sampling_defaults = generation_defaults(self.engine.info.tokenizer_path)
        return self._sampling_defaults

    @property
    def grammars(self) -> GrammarCompiler:
        """Checks structured outputs against this model's tokenizer (built on the first one)."""
        if self._grammars is None:
            engine = self.engine
            self._grammars = GrammarCompiler(lambda: engine.tokenizer, engine.info.vocab_size,
                                             engine.info.eos_token_ids)
        return self._grammars

    @property
    def num_waiting(self) -> int:
        """Accepted but not running: reserved by admission, on the way to the engine, or waiting in it."""
        return self.num_reserved + self.engine.num_waiting_requests

    def mark_failed(self, error: str) -> None:
        self.status, self.error, self.build = FAILED, error, None


class DuplicateModelNameError(ValueError):
    """Two served models would answer to one name."""


class ModelRegistry:
    """Served models by canonical name, in registration order; the first is the default model."""

    def __init__(self, build_retry_after_s: int = 5):
        self.build_retry_after_s = build_retry_after_s
        self._models: dict[str, ServedModel] = {}

    def __len__(self) -> int:
        return len(self._models)

    def __iter__(self):
        return iter(list(self._models.values()))

    def add_ready(self, name: str, engine: EngineClient) -> ServedModel:
        model = self._add(ServedModel(name, status=BUILDING))
        model.mark_ready(engine)
        return model

    def add_building(self, name: str, build: EngineBuild) -> ServedModel:
        """Register `name` as building; the app runs `build()` once it starts (see builds.run_builds)."""
        return self._add(ServedModel(name, status=BUILDING, build=build))

    def _add(self, model: ServedModel) -> ServedModel:
        assert model.name, "a served model name must not be empty"
        if model.name in self._models:
            raise DuplicateModelNameError(
                f"two models would be served as {model.name!r}; every served model needs its own name "
                f"(rename the main one with --served-model-name)")
        if model.name == DEFAULT_ALIAS and self._models:
            raise DuplicateModelNameError(
                f"{DEFAULT_ALIAS!r} is the alias of the first model ({next(iter(self._models))!r}); "
                f"serve this one under another name")
        self._models[model.name] = model
        return model

    def ready(self) -> list[ServedModel]:
        return [m for m in self._models.values() if m.status == READY]

    def statuses(self) -> dict[str, str]:
        return {name: model.status for name, model in self._models.items()}

    def default(self) -> ServedModel | None:
        """The default model: the first registered (ready, building or failed)."""
        return next(iter(self._models.values()), None)

    def find(self, name: str | None) -> ServedModel | None:
        """The model `name` names: its canonical name, `default` (or None) for the default model."""
        if name is None or (name == DEFAULT_ALIAS and name not in self._models):
            return self.default()
        return self._models.get(name)

    def select(self, name: str | None) -> ServedModel:
        """The ready model `name` names (None: the default), or the APIError a request for it gets."""
        model = self.find(name)
        if model is None:
            raise APIError(404, f"the model '{name}' does not exist; this server serves {self._names_served()}",
                           param="model", code="model_not_found")
        if model.status == BUILDING:
            raise APIError(503, f"model {model.name} is being built; retry later", param="model",
                           code="model_building", headers={"Retry-After": str(self.build_retry_after_s)})
        if model.status == FAILED:
            raise APIError(500, f"model {model.name} failed to build: {model.error}", param="model",
                           code="model_build_failed")
        return model

    def _names_served(self) -> str:
        served = ", ".join(repr(n) for n in self._models)
        return served if DEFAULT_ALIAS in self._models else f"{served} (and {DEFAULT_ALIAS!r} for the first)"
