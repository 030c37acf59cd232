"""The engine-core process's wire: ZeroMQ frames of msgspec msgpack, and the start-up handshake.

Client -> core (a DEALER per API process to the core's ROUTER): one frame, a `ClientMessage`
(tagged: `Hello`, `EngineCoreRequest`, `AbortRequests`).
Core -> client: two frames, a kind byte (`OUTPUTS`, `READY`, `FAILED`) then the payload
(`EngineCoreOutputs`, `CoreReady`, `CoreFailed`).
Spawner <-> core: a pipe. After start-up the core writes one `CoreReady` or `CoreFailed` to it;
the spawner never writes, and closing its end (or dying) stops the core.
Plain data only: no pickled objects cross, and no home-made framing.
"""

from __future__ import annotations

import msgspec
import zmq

from llmserve.core.messages import AbortRequests, EngineCoreRequest, ModelInfo


class Hello(msgspec.Struct, array_like=True, tag="hello"):
    """A client announces itself: the core answers `CoreReady`, then keeps its stats fresh even when idle."""


class CoreReady(msgspec.Struct, array_like=True):
    """The core accepts requests: what it serves, and its process id (clients watch it for death)."""

    info: ModelInfo
    pid: int


class CoreFailed(msgspec.Struct, array_like=True):
    """The core could not start, or a step failed and it is exiting: the error in one line."""

    message: str


ClientMessage = EngineCoreRequest | AbortRequests | Hello

# Kind frames of core -> client messages: outputs are by far the most frequent, so they carry no tag to match.
OUTPUTS = b"o"
READY = b"r"
FAILED = b"f"

SOCKET_NAME = "engine-core.sock"


def core_address(directory: str) -> str:
    """The ipc:// address of the core's socket in a private directory (unix socket paths stay short there)."""
    return f"ipc://{directory}/{SOCKET_NAME}"


def configure_socket(socket: zmq.Socket) -> None:
    """No high-water mark: an output dropped by ZeroMQ would leave a request hanging forever; no linger on close."""
    socket.setsockopt(zmq.SNDHWM, 0)
    socket.setsockopt(zmq.RCVHWM, 0)
    socket.setsockopt(zmq.LINGER, 0)


def one_line(exc: BaseException) -> str:
    """An exception as one line for the terminal: the text of the errors users cause (bad input, missing files,
    our own errors), the type name too for the others (a bug's KeyError says little without it)."""
    text = " ".join(str(exc).split())
    ours = type(exc).__module__.startswith("llmserve.")
    if (isinstance(exc, (ValueError, OSError)) or ours) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
