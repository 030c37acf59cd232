"""How the API side talks to an engine core: send requests and aborts, receive one message per step.

Two implementations: in this process (the core steps in an asyncio task of the caller's loop) and
in a separate engine-core process over ZeroMQ. The client on top (detokenization, stop strings,
per-request streams) is the same for both.
"""

from __future__ import annotations

from typing import Protocol

from llmserve.core.messages import EngineCoreOutputs, EngineCoreRequest, ModelInfo


class CoreClient(Protocol):
    """A running engine core, seen from one API process."""

    info: ModelInfo  # set once `start` returns

    async def start(self) -> None:
        """Load or connect to the core; returns when it accepts requests."""

    async def shutdown(self) -> None:
        """Stop the core (or disconnect from it); pending requests are dropped."""

    @property
    def is_alive(self) -> bool:
        """False before start, after shutdown, and once the core died."""

    def add_request(self, request: EngineCoreRequest) -> None:
        """Queue a request for the core; never blocks on the core."""

    def abort_requests(self, request_ids: list[str]) -> None:
        """Ask the core to end these requests and free their blocks; never blocks."""

    async def get_output(self) -> EngineCoreOutputs:
        """The next step's outputs for this client's requests (with the core's latest stats).

        Raises EngineDeadError (llmserve.frontend.engine_client) once the core has died or stopped.
        """

    def get_output_nowait(self) -> EngineCoreOutputs | None:
        """A step's outputs that have already arrived, or None; never waits. (Optional: a client
        without it is read one step per `get_output`.)"""
