"""Running the app until a signal, and shutting it down in order.

SIGINT and SIGTERM behave alike. The first starts a graceful shutdown (see `app.py` for its steps);
a second one aborts every in-flight request at once. With the defaults the whole sequence takes at
most about shutdown_timeout (20 s) + ABORT_GRACE_S (2 s) + RUNNER_SHUTDOWN_S (1 s) plus the engine
stop, inside the 30 s that Kubernetes waits between SIGTERM and SIGKILL.
"""

from __future__ import annotations

import asyncio
import signal

from aiohttp import web

from llmserve.server.announce import announce, banner_lines
from llmserve.server.app import drain_inflight, runner_kwargs
from llmserve.server.state import ABORT_NOW, CONFIG, MODELS, SHUTTING_DOWN

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
ENGINE_WATCH_S = 0.1  # how often the engines are checked: a dead engine core stops the server within a few seconds


class ListenError(RuntimeError):
    """The server could not listen on its host and port."""


async def graceful_shutdown(runner: web.AppRunner) -> int:
    """Stop listening, drain the in-flight requests (answering 503 on open connections meanwhile),
    then let aiohttp close everything; returns how many requests had to be aborted."""
    app = runner.app
    app[SHUTTING_DOWN].set()
    for site in list(runner.sites):
        await site.stop()
    num_aborted = await drain_inflight(app)
    app[ABORT_NOW].set()  # a request that slipped in after the drain is aborted, not waited for again
    await runner.cleanup()
    announce.info("llmserve stopped")
    return num_aborted


async def serve_until_signalled(app: web.Application, stop_signals: tuple[int, ...] = STOP_SIGNALS,
                                reuse_port: bool = False) -> int:
    """Serve `app` on its configured host and port until a stop signal (SIGINT/SIGTERM) or an engine's death;
    the process exit status (0 when every in-flight request finished, 1 when some were aborted or an engine
    died, so that a service manager restarts the server). `reuse_port`: several API processes share the port."""
    config = app[CONFIG]
    signals = _SignalCounter(app, stop_signals)
    signals.install()
    try:
        runner = web.AppRunner(app, handle_signals=False, **runner_kwargs(config))
        await runner.setup()
        port = await _listen(runner, config.host, config.port, reuse_port)
        for line in banner_lines(config, app[MODELS], port):
            announce.info(line)
        engine_died = await _until_stopped_or_engine_died(app, signals)
        num_aborted = await graceful_shutdown(runner)
    finally:
        signals.uninstall()
    return 1 if num_aborted or engine_died else 0


async def _until_stopped_or_engine_died(app: web.Application, signals: "_SignalCounter") -> bool:
    """Wait for the first stop signal (False) or for a serving model's engine to stop running (True)."""
    stopped = asyncio.create_task(signals.first.wait())
    try:
        while not stopped.done():
            dead = [model.name for model in app[MODELS].ready() if not model.engine.is_running]
            if dead:
                announce.error("the engine of model %r is not running any more: shutting down (exit status 1, "
                               "for a service manager to restart the server)", dead[0])
                return True
            await asyncio.wait({stopped}, timeout=ENGINE_WATCH_S)
        return False
    finally:
        stopped.cancel()


async def _listen(runner: web.AppRunner, host: str, port: int, reuse_port: bool = False) -> int:
    """Start the TCP site; the bound port, or ListenError (after stopping the engines) when it cannot bind."""
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        reason = exc.strerror or str(exc)
        raise ListenError(f"cannot listen on {host}:{port}: {reason}; is another server running there? "
                          f"pick another --port or --host") from exc
    return runner.addresses[0][1]


class _SignalCounter:
    """The first stop signal sets `first`; the second sets the app's ABORT_NOW."""

    def __init__(self, app: web.Application, stop_signals: tuple[int, ...] = STOP_SIGNALS):
        self.app = app
        self.stop_signals = stop_signals
        self.first = asyncio.Event()
        self.count = 0

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in self.stop_signals:
            loop.add_signal_handler(signum, self._on_signal, signum)

    def uninstall(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in self.stop_signals:
            loop.remove_signal_handler(signum)

    def _on_signal(self, signum: int) -> None:
        self.count += 1
        name = signal.Signals(signum).name
        if self.count == 1:
            announce.info("%s received: shutting down (no new requests)", name)
            self.first.set()
        elif self.count == 2:
            announce.warning("%s received again: not waiting for in-flight requests any longer", name)
            self.app[ABORT_NOW].set()
