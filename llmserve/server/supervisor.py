"""`serve --api-server-count N`: one engine-core process, N API processes on one port, and a supervisor.

The command's own process only supervises. It starts the engine core (which loads the model), then N
API processes that join the core over ZeroMQ and listen on the same port (SO_REUSEPORT: the kernel
spreads connections over them). If any of them dies, the others are stopped and the command exits
non-zero within a few seconds, for a service manager to restart it.

Stop signals: SIGINT/SIGTERM sent to this process are relayed to every API process as SIGUSR1 (the
first) and SIGUSR2 (the second), the only stop signals they heed, so that one sent to the whole
process group (a Ctrl-C in the terminal, systemd's default KillMode) is not counted twice. The first
drains in-flight requests (up to --shutdown-timeout), the second aborts them, a third kills everything.
"""

from __future__ import annotations

import argparse
import copy
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time

from llmserve.engine.core_process import LOG_FORMAT, CoreProcess, describe_exit, exit_now
from llmserve.server.announce import announce

# two distinct signals: the same one sent twice in a row may arrive once (standard signals do not queue)
API_STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
RELAYED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
STOP_GRACE_S = 5.0  # once told to abort, how long an API process gets to exit before it is killed
KILL_AFTER_SIGNALS = 3
WATCH_S = 1.0  # the longest the supervisor sleeps without looking at its processes


def serve_with_api_processes(args: argparse.Namespace) -> int:
    """Run the engine core and args.api_server_count API processes until a stop signal or a death;
    the exit status (non-zero when a process died or requests had to be aborted)."""
    from llmserve.checkpoint.pull import resolve_model
    from llmserve.cli import engine_config_from_args

    config = engine_config_from_args(args)
    config.model = str(resolve_model(config.model, progress=_say))  # pull the default model once, here
    core = CoreProcess.launch(config)
    try:
        core.wait_ready()
        api_args = copy.copy(args)
        api_args.port = args.port or _free_port(args.host)
        processes = [_start_api_process(api_args, core.address, index) for index in range(args.api_server_count)]
    except BaseException:
        core.stop()
        raise
    return Supervisor(core, processes).run()


def _start_api_process(args: argparse.Namespace, core_address: str, index: int) -> multiprocessing.Process:
    context = multiprocessing.get_context("spawn")
    process = context.Process(target=run_api_process, args=(args, core_address, index),
                              name=f"llmserve-api-{index}")
    process.start()
    return process


def run_api_process(args: argparse.Namespace, core_address: str, index: int) -> None:
    """Entry of one API process: `serve` over the shared core until the supervisor relays a stop signal."""
    for signum in RELAYED_SIGNALS:  # the supervisor relays these as API_STOP_SIGNALS
        signal.signal(signum, signal.SIG_IGN)
    for signum in API_STOP_SIGNALS:  # until `serve` handles them: stopped before serving, nothing to drain
        signal.signal(signum, _exit_before_serving)
    _end_with_the_supervisor()
    logging.basicConfig(level=args.log_level, format=LOG_FORMAT)
    if index:  # one banner, not N (a filter, since `serve` sets the announcer's level itself)
        logging.getLogger("llmserve.announce").addFilter(lambda record: record.levelno >= logging.WARNING)
    args.core_address = core_address
    try:
        status = args.func(args)
    except Exception as exc:  # what the CLI's main() would print: one line, no traceback
        print(f"error: API process {index}: {type(exc).__name__}: {exc}", file=sys.stderr)
        status = 1
    exit_now(status)


def _end_with_the_supervisor() -> None:
    """Stop this API process (drain, abort, then exit 1) once the supervisor is gone, killed with SIGKILL
    say: it is never left running orphaned, even while still starting and waiting for the core."""
    supervisor = multiprocessing.parent_process()

    def watch() -> None:
        multiprocessing.connection.wait([supervisor.sentinel])
        for signum in API_STOP_SIGNALS:
            os.kill(os.getpid(), signum)
        time.sleep(STOP_GRACE_S)
        os._exit(1)

    threading.Thread(target=watch, name="llmserve-supervisor-watch", daemon=True).start()


def _exit_before_serving(_signum, _frame) -> None:
    raise SystemExit(0)


class Supervisor:
    """Watches the engine core and the API processes; relays stop signals; any death stops them all."""

    def __init__(self, core: CoreProcess, api_processes: list[multiprocessing.Process]):
        self.core = core
        self.api_processes = api_processes
        self.num_signals = 0
        self.failure: str | None = None
        self.kill_at: float | None = None  # when the API processes still running get SIGKILL

    def run(self) -> int:
        """Wait until every API process has ended; then stop the core. The exit status."""
        previous = {signum: signal.signal(signum, self._on_signal) for signum in RELAYED_SIGNALS}
        try:
            while running := self._running():
                # the sentinels of the processes seen running: one that ends from here on wakes the wait
                # (computing the list again could miss one that ended in between, and wait for the core alone)
                timeout = WATCH_S if self.kill_at is None else min(max(self.kill_at - time.monotonic(), 0), WATCH_S)
                multiprocessing.connection.wait([self.core.sentinel] + [p.sentinel for p in running], timeout)
                self._check()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self.core.stop()
        return self._exit_status()

    def _running(self) -> list[multiprocessing.Process]:
        return [p for p in self.api_processes if p.exitcode is None]

    def _check(self) -> None:
        if self.kill_at is not None and time.monotonic() >= self.kill_at:
            for process in self._running():
                process.kill()
                process.join()
        if self.failure is not None:
            return
        if self.core.process.exitcode is not None:
            self._fail(f"the engine core process {describe_exit(self.core.process.exitcode)}")
            return
        ended = [p for p in self.api_processes if p.exitcode is not None]
        if ended and self.num_signals == 0:
            self._fail(f"API process {ended[0].name} {describe_exit(ended[0].exitcode)}")

    def _fail(self, what: str) -> None:
        self.failure = what
        announce.error("%s: stopping the server (exit status 1, for a supervisor to restart it)", what)
        self._relay(*API_STOP_SIGNALS)  # drain and abort at once: the others must not keep serving half a server
        self.kill_at = time.monotonic() + STOP_GRACE_S

    def _on_signal(self, signum: int, _frame) -> None:
        self.num_signals += 1
        name = signal.Signals(signum).name
        if self.num_signals >= KILL_AFTER_SIGNALS:
            announce.warning("%s received a third time: killing the API processes", name)
            self.kill_at = time.monotonic()
            return
        announce.info("%s received: %s the API processes", name,
                      "stopping" if self.num_signals == 1 else "aborting the in-flight requests of")
        self._relay(API_STOP_SIGNALS[self.num_signals - 1])

    def _relay(self, *signals: int) -> None:
        for process in self._running():
            for signum in signals:
                try:
                    os.kill(process.pid, signum)
                except ProcessLookupError:
                    pass

    def _exit_status(self) -> int:
        if self.failure is not None:
            return 1
        codes = [p.exitcode for p in self.api_processes]
        return 0 if all(code == 0 for code in codes) else 1


def _free_port(host: str) -> int:
    """A port free on `host` now, for --port 0 (every API process must listen on the same one)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _say(message: str) -> None:
    print(message, file=sys.stderr)
