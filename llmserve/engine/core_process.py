"""The engine-core process: build the EngineCore, report READY (or the start-up error), then the busy loop.

`CoreProcess.launch` starts it with multiprocessing's spawn context (CUDA cannot run in a forked
child), from the API process (one API process) or from the supervisor (several). The loop takes
every pending request and abort without blocking, steps, and sends each client ONE message per
step with its requests' outputs; it blocks only when there is nothing to run. The core stops when
its spawner closes the control pipe or dies, so it is never left running orphaned. The wire is
described in llmserve/core/ipc.py. Torch is imported in the child only.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import defaultdict

import msgspec
import zmq

from llmserve.config import EngineConfig
from llmserve.core.ipc import (FAILED, OUTPUTS, READY, AbortRequests, ClientMessage, CoreFailed, CoreReady,
                               EngineCoreRequest, Hello, configure_socket, core_address, one_line)
from llmserve.core.messages import EngineCoreOutput, EngineCoreOutputs

logger = logging.getLogger(__name__)

# the CLI's format plus the process's name: the core's and each API process's lines can be told apart
LOG_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"
STATS_INTERVAL_S = 1.0  # while busy, a client with no outputs still gets fresh stats this often (/metrics)
STOP_TIMEOUT_S = 5.0  # a step in flight when asked to stop gets this long before the core is killed
FAILED_FLUSH_MS = 1000  # how long the last messages (a step's failure) may take to leave on exit
EXIT_INTERRUPTED = 130


class CoreStartupError(RuntimeError):
    """The engine core could not start; the message is the core's error in one line."""


# ---- the child ---------------------------------------------------------------------------------
def run_engine_core(config: bytes | None, address: str, control: multiprocessing.connection.Connection,
                    log_level: int, build=None) -> None:
    """Process entry: build the core from the msgpack'd EngineConfig (or call `build`), report on `control`,
    serve `address`."""
    logging.basicConfig(level=log_level, format=LOG_FORMAT)
    watchdog = _SpawnerWatchdog(control)
    watchdog.start()
    core = _build_core(config, control, build)
    # From here the spawner alone decides when the core stops (by closing `control`): a Ctrl-C in the
    # terminal or a SIGTERM to the whole group must not end it while the API processes drain their requests.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    watchdog.stop()
    context = zmq.Context()
    socket = context.socket(zmq.ROUTER)
    configure_socket(socket)
    socket.bind(address)
    control.send_bytes(READY + msgspec.msgpack.encode(CoreReady(core.info, os.getpid())))
    status = CoreBusyLoop(core, socket, control).run()
    if not status and hasattr(core, "shutdown"):
        core.shutdown()  # a parallel engine's workers leave the process group (after a failure they exit on their own)
    socket.close(linger=FAILED_FLUSH_MS if status else 0)
    context.term()
    exit_now(status)


def _build_core(config: bytes | None, control, build=None):
    """The EngineCore, or exit after writing the start-up error (one line) to the spawner."""
    try:
        if build is not None:
            return build()
        from llmserve.engine.engine_core import EngineCore

        engine_config = msgspec.msgpack.decode(config, type=EngineConfig)
        return EngineCore.from_config(engine_config, progress=functools.partial(print, file=sys.stderr, flush=True))
    except KeyboardInterrupt:  # Ctrl-C during a long load: the spawner got it too and says so
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:
        logger.debug("engine core start-up failed", exc_info=True)
        control.send_bytes(FAILED + msgspec.msgpack.encode(CoreFailed(one_line(exc))))
        sys.exit(1)


class _SpawnerWatchdog(threading.Thread):
    """During start-up (a model download can take minutes) exit at once if the spawner goes away."""

    def __init__(self, control):
        super().__init__(name="llmserve-spawner-watchdog", daemon=True)
        self.control = control
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            # the spawner never writes: readable means its end closed (it stopped us or died)
            if self.control.poll(0.2) and not self.done.is_set():
                os._exit(1)

    def stop(self) -> None:
        self.done.set()
        self.join()


class CoreBusyLoop:
    """Take new requests and aborts, step, send each client its outputs; never waits on a client."""

    def __init__(self, core, socket: zmq.Socket, control):
        self.core = core
        self.socket = socket
        self.control_fd = control.fileno()
        self.decoder = msgspec.msgpack.Decoder(ClientMessage)
        self.encoder = msgspec.msgpack.Encoder()
        self.owners: dict[str, bytes] = {}  # request id -> identity of the client that sent it
        self.clients: dict[bytes, float] = {}  # identity -> monotonic time it was last sent anything
        self.num_received: dict[bytes, int] = defaultdict(int)  # identity -> its EngineCoreRequests taken so far
        self.news: set[bytes] = set()  # clients whose adds/aborts were taken since they last heard (admission counts)
        self.stats_changed = False  # since every client last heard
        self.poller = zmq.Poller()
        self.poller.register(socket, zmq.POLLIN)
        self.poller.register(self.control_fd, zmq.POLLIN)

    def run(self) -> int:
        """Serve until the spawner leaves (0) or a step fails (1, after telling every client)."""
        while True:
            busy = self.core.has_unfinished_requests()
            if not busy and self.stats_changed:  # just went idle: every client sees the final numbers (0 blocks)
                self._send_stats(list(self.clients))
                self.stats_changed = False
            events = dict(self.poller.poll(0 if busy else None))
            if self.control_fd in events:
                return 0
            if self.socket in events:
                self._take_messages()
            if self.core.has_unfinished_requests() and not self._step():
                return 1

    # ---- client -> core ---------------------------------------------------------------------
    def _take_messages(self) -> None:
        while True:
            try:
                identity, payload = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                message = self.decoder.decode(payload)
            except msgspec.DecodeError as exc:
                logger.warning("ignoring a malformed message from a client: %s", exc)
                continue
            self.stats_changed = True
            self.news.add(identity)
            self._handle(identity, message)

    def _handle(self, identity: bytes, message) -> None:
        match message:
            case EngineCoreRequest():
                self._add(identity, message)
            case AbortRequests(request_ids=request_ids):
                mine = [r for r in request_ids if self.owners.get(r) == identity]
                for request_id in mine:
                    del self.owners[request_id]
                self.core.abort_requests(mine)
            case Hello():
                self.clients[identity] = 0.0
                self._send(identity, READY, CoreReady(self.core.info, os.getpid()))

    def _add(self, identity: bytes, request: EngineCoreRequest) -> None:
        self.clients.setdefault(identity, 0.0)
        self.num_received[identity] += 1
        try:
            if request.request_id in self.owners:
                raise ValueError("its request id is already in use")
            self.core.add_request(request)
        except ValueError as exc:  # clients check requests before sending: this is a client bug, not a crash
            logger.warning("request %s refused: %s", request.request_id, exc)
            ended = EngineCoreOutput(request.request_id, [], finish_reason="abort")
            self._send(identity, OUTPUTS, EngineCoreOutputs([ended], self.core.stats(), time.time()))
            return
        self.owners[request.request_id] = identity

    # ---- the step and core -> client ----------------------------------------------------------
    def _step(self) -> bool:
        try:
            step = self.core.step()
        except Exception as exc:
            logger.exception("engine step failed; the engine core exits")
            self._send_failure(f"engine step failed: {one_line(exc)}")
            return False
        self.stats_changed = True
        by_client: dict[bytes, list[EngineCoreOutput]] = defaultdict(list)
        for output in step.outputs:
            owner = self.owners.pop(output.request_id, None) if output.finished else self.owners.get(output.request_id)
            if owner is not None:
                by_client[owner].append(output)
        for identity, outputs in by_client.items():
            self._send(identity, OUTPUTS, EngineCoreOutputs(outputs, step.stats, step.timestamp))
        now = time.monotonic()
        self._send_stats([c for c, last in self.clients.items() if c in self.news or now - last >= STATS_INTERVAL_S],
                         step)
        return True

    def _send_stats(self, identities: list[bytes], step: EngineCoreOutputs | None = None) -> None:
        stats = self.core.stats() if step is None else step.stats
        for identity in identities:
            self._send(identity, OUTPUTS, EngineCoreOutputs([], stats, time.time()))

    def _send_failure(self, message: str) -> None:
        for identity in set(self.clients) | set(self.owners.values()):
            self._send(identity, FAILED, CoreFailed(message))

    def _send(self, identity: bytes, kind: bytes, message) -> None:
        if kind == OUTPUTS:
            message.num_requests_received = self.num_received[identity]
        # a ROUTER never blocks: a message for a client that went away is dropped
        self.socket.send_multipart([identity, kind, self.encoder.encode(message)])
        self.clients[identity] = time.monotonic()
        self.news.discard(identity)


# ---- the spawner's side ----------------------------------------------------------------------
class CoreProcess:
    """The engine-core process seen from its spawner: launch it, wait until it is ready, stop it."""

    def __init__(self, process: multiprocessing.Process, control, directory: str):
        self.process = process
        self.control = control  # our end of the pipe: the core reports on it; closing it stops the core
        self.directory = directory  # private, holds the ipc socket
        self.address = core_address(directory)

    @classmethod
    def launch(cls, config: EngineConfig | None, log_level: int | None = None, build=None) -> "CoreProcess":
        """Start the engine-core process for `config` (it loads the model; see `wait_ready`). `build` instead:
        a picklable callable that returns the EngineCore in the child (tests serve in-memory models so)."""
        if (config is None) == (build is None):
            raise ValueError("launch an engine core from an EngineConfig or from a build callable")
        directory = tempfile.mkdtemp(prefix="llmserve-core-")
        context = multiprocessing.get_context("spawn")
        control, child_end = context.Pipe()
        level = logging.getLogger().getEffectiveLevel() if log_level is None else log_level
        encoded = None if config is None else msgspec.msgpack.encode(config)
        process = context.Process(target=run_engine_core, name="llmserve-engine-core",
                                  args=(encoded, core_address(directory), child_end, level, build))
        process.start()
        child_end.close()
        return cls(process, control, directory)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def sentinel(self) -> int:
        """A file descriptor that becomes readable when the process ends."""
        return self.process.sentinel

    def wait_ready(self) -> CoreReady:
        """Block until the core reports; CoreStartupError with its message when it could not start."""
        multiprocessing.connection.wait([self.control, self.process.sentinel])
        report = b""
        if self.control.poll():
            try:
                report = self.control.recv_bytes()
            except EOFError:
                pass
        if report[:1] == READY:
            return msgspec.msgpack.decode(report[1:], type=CoreReady)
        self.process.join(STOP_TIMEOUT_S)
        if report[:1] == FAILED:
            raise CoreStartupError(msgspec.msgpack.decode(report[1:], type=CoreFailed).message)
        raise CoreStartupError(f"the engine core process {describe_exit(self.process.exitcode)} during start-up")

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """Close the control pipe (the core leaves its loop), wait, kill it if it hangs; its exit code."""
        self.control.close()
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        shutil.rmtree(self.directory, ignore_errors=True)
        return self.process.exitcode


def exit_now(status: int) -> None:
    """End a child process at once: the interpreter's teardown (seconds of garbage collection over torch's and
    the tokenizer's objects on a busy machine) has nothing to save, and it delays the whole server's stop."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def describe_exit(exitcode: int | None) -> str:
    """'exited with status 1', 'was killed by SIGKILL' (an out-of-memory kill looks like this), ..."""
    if exitcode is None:
        return "is still running"
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with status {exitcode}"
