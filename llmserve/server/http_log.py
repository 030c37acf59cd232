"""aiohttp's connection logger, with a malformed request logged as one WARNING line.

aiohttp logs a request it cannot parse at ERROR with a traceback; that is a client's
mistake (or a scanner's), not the server's, and anyone could flood the log with it.
"""

from __future__ import annotations

import logging

from aiohttp.http_exceptions import HttpProcessingError

AIOHTTP_SERVER_LOGGER = "aiohttp.server"


class ConnectionLogger(logging.LoggerAdapter):
    """Pass as `logger=` to web.AppRunner / web.run_app; everything else goes to aiohttp's logger unchanged."""

    def __init__(self, logger: logging.Logger | None = None):
        super().__init__(logger or logging.getLogger(AIOHTTP_SERVER_LOGGER), {})

    def log(self, level: int, msg, *args, exc_info=None, **kwargs) -> None:
        if level >= logging.ERROR and isinstance(exc_info, HttpProcessingError):
            summary = (exc_info.message or type(exc_info).__name__).strip().splitlines()[0].rstrip(":")
            self.logger.warning("malformed HTTP request: %s (%s)", summary, msg % args if args else msg)
            return
        super().log(level, msg, *args, exc_info=exc_info, **kwargs)
