"""A CoreClient whose engine core runs in another process, reached over ZeroMQ (see llmserve/core/ipc.py).

`MPCoreClient(config)` spawns the core and stops it on shutdown (one API process);
`MPCoreClient(address=...)` joins a core that a supervisor started for several API processes.
Either way the client watches the core's process: once it ends, `get_output` raises
EngineDeadError at once instead of waiting for a message that will never come.
"""

from __future__ import annotations

import asyncio
import os

import msgspec
import zmq
import zmq.asyncio

from llmserve.config import EngineConfig
from llmserve.core.ipc import FAILED, OUTPUTS, READY, CoreFailed, CoreReady, Hello, configure_socket
from llmserve.core.messages import AbortRequests, EngineCoreOutputs, EngineCoreRequest, ModelInfo
from llmserve.engine.core_process import CoreProcess, describe_exit
from llmserve.frontend.engine_client import EngineDeadError

CONNECT_TIMEOUT_S = 30.0  # a running core answers Hello in milliseconds; this only bounds a wrong address
PID_POLL_S = 0.2
CLOSE_LINGER_MS = 1000
EXIT_CODE_WAIT_S = 1.0  # a joined core must still get the aborts sent just before shutdown  # where the platform has no pidfd, how often a joined core's pid is checked


class MPCoreClient:
    """A CoreClient over ZeroMQ to an engine-core process that it spawns or joins."""

    def __init__(self, config: EngineConfig | None = None, *, address: str | None = None, build=None,
                 connect_timeout: float = CONNECT_TIMEOUT_S):
        if sum(x is not None for x in (config, address, build)) != 1:
            raise ValueError("MPCoreClient needs an EngineConfig or a build callable (to spawn the core) or an "
                             "address (to join one)")
        self.config = config
        self.build = build  # a picklable callable returning the EngineCore, run in the spawned process
        self.address = address
        self.connect_timeout = connect_timeout
        self.info: ModelInfo | None = None
        self.core_pid: int | None = None
        self.process: CoreProcess | None = None  # the core, when this client spawned it
        self._context: zmq.asyncio.Context | None = None
        self._socket: zmq.asyncio.Socket | None = None
        self._encoder = msgspec.msgpack.Encoder()
        self._outputs = msgspec.msgpack.Decoder(EngineCoreOutputs)
        self._dead: str | None = "the engine core is not started"  # why nothing can be served; None while alive
        self._death: asyncio.Future | None = None  # resolved when the core ends or this client shuts down
        self._watch: asyncio.Task | int | None = None  # a pidfd (or a polling task) watching a joined core

    # ---- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Spawn (or join) the core; returns once it accepts requests. CoreStartupError carries its start-up error."""
        if self.address is None:
            self.process = CoreProcess.launch(self.config, build=self.build)
            try:
                await asyncio.to_thread(self.process.wait_ready)
            except BaseException:
                self.process.stop()
                raise
            self.address = self.process.address
        self._death = asyncio.get_running_loop().create_future()
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.DEALER)
        configure_socket(self._socket)
        self._socket.connect(self.address)
        try:
            ready = await self._handshake()
        except BaseException:
            await self.shutdown()
            raise
        self.info, self.core_pid = ready.info, ready.pid
        self._dead = None
        self._watch_core()

    async def _handshake(self) -> CoreReady:
        await self._socket.send(self._encoder.encode(Hello()))
        try:
            kind, payload = await asyncio.wait_for(self._socket.recv_multipart(), self.connect_timeout)
        except asyncio.TimeoutError:
            raise EngineDeadError(f"no engine core answered at {self.address} within "
                                  f"{self.connect_timeout:g} s") from None
        if kind != READY:
            raise EngineDeadError(f"the engine core at {self.address} answered {kind!r} instead of READY")
        return msgspec.msgpack.decode(payload, type=CoreReady)

    async def shutdown(self) -> None:
        """Disconnect; stop the core too when this client spawned it. Pending requests are dropped."""
        self._mark_dead("the engine core was shut down")
        self._unwatch()
        if self._socket is not None:
            self._socket.close(linger=0 if self.process is not None else CLOSE_LINGER_MS)
            self._context.term()
            self._socket = self._context = None
        if self.process is not None:
            await asyncio.to_thread(self.process.stop)

    @property
    def is_alive(self) -> bool:
        return self._dead is None

    # ---- requests ---------------------------------------------------------------------------
    def add_request(self, request: EngineCoreRequest) -> None:
        """Queue a request for the core; never blocks. EngineDeadError once the core is gone."""
        self._send(request)

    def abort_requests(self, request_ids: list[str]) -> None:
        """Ask the core to end these requests and free their blocks; never blocks."""
        if self._dead is None:
            self._send(AbortRequests(list(request_ids)))

    def _send(self, message) -> None:
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        sent = self._socket.send(self._encoder.encode(message), flags=zmq.NOBLOCK)
        if sent.exception() is not None:  # zmq.Again: no connected core to queue for (it went away)
            raise EngineDeadError(f"the engine core at {self.address} is unreachable")

    async def get_output(self) -> EngineCoreOutputs:
        """The next step's outputs for this client's requests (or fresh stats); EngineDeadError once the core is gone."""
        while True:
            kind, payload = await self._receive()
            if kind == OUTPUTS:
                return self._outputs.decode(payload)
            if kind == FAILED:
                self._mark_dead(msgspec.msgpack.decode(payload, type=CoreFailed).message)
                raise EngineDeadError(self._dead)

    def get_output_nowait(self) -> EngineCoreOutputs | None:
        """Outputs already waiting in the socket, or None; FAILED raises EngineDeadError as get_output does."""
        while self._dead is None:
            received = self._socket.recv_multipart(flags=zmq.NOBLOCK)
            if received.exception() is not None:  # zmq.Again: nothing has arrived
                return None
            kind, payload = received.result()
            if kind == OUTPUTS:
                return self._outputs.decode(payload)
            if kind == FAILED:
                self._mark_dead(msgspec.msgpack.decode(payload, type=CoreFailed).message)
        raise EngineDeadError(self._dead)

    async def _receive(self) -> list[bytes]:
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        receiving = self._socket.recv_multipart()
        try:
            await asyncio.wait((receiving, self._death), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not receiving.done():
                receiving.cancel()
        if receiving.cancelled():
            raise EngineDeadError(self._dead)
        return receiving.result()

    # ---- watching the core's process ------------------------------------------------------------
    def _watch_core(self) -> None:
        loop = asyncio.get_running_loop()
        if self.process is not None:
            loop.add_reader(self.process.sentinel, self._on_core_exit)
            return
        if not hasattr(os, "pidfd_open"):
            self._watch = asyncio.create_task(self._poll_pid())
            return
        try:
            self._watch = os.pidfd_open(self.core_pid)
        except ProcessLookupError:
            self._on_core_exit()
            return
        loop.add_reader(self._watch, self._on_core_exit)

    async def _poll_pid(self) -> None:
        while _pid_exists(self.core_pid):
            await asyncio.sleep(PID_POLL_S)
        self._on_core_exit()

    def _on_core_exit(self) -> None:
        self._unwatch()
        how = "exited"
        if self.process is not None:
            # the sentinel is readable as the child's files close, a moment before it can be reaped
            self.process.process.join(EXIT_CODE_WAIT_S)
            how = describe_exit(self.process.process.exitcode)
        self._mark_dead(f"the engine core process (pid {self.core_pid}) {how}; the server must be restarted")

    def _unwatch(self) -> None:
        loop = asyncio.get_running_loop()
        if self.process is not None:
            loop.remove_reader(self.process.sentinel)
        if isinstance(self._watch, int):
            loop.remove_reader(self._watch)
            os.close(self._watch)
        elif isinstance(self._watch, asyncio.Task) and self._watch is not asyncio.current_task():
            self._watch.cancel()
        self._watch = None

    def _mark_dead(self, reason: str) -> None:
        if self._dead is None:
            self._dead = reason
        if self._death is not None and not self._death.done():
            self._death.set_result(None)


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
